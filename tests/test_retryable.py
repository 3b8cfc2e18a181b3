"""
Which errors Airflow retries and which fail a task at once (the table "Retried or failed at once" of
docs/troubleshooting.md), as the real Looker hook raises them against the stand-in, and per exception
class.
"""

from __future__ import annotations

import pytest
from looker_helpers import make_self_signed_cert
from standins.looker_fixtures import DELETED_LOOK_ID, TOASTMATES_LOOK_ID
from standins.looker_standin import LookerStandIn
from test_looker_hook import WRONG_SECRET, hook, looker, make_hook, stream_all  # noqa: F401  (fixtures)

from airflow_provider_looker_segment import exceptions as errors
from airflow_provider_looker_segment.exceptions import LookerApiError, LookerRequestError, is_retryable

#: docs/troubleshooting.md's table: retried (True) or failed at once (False).
TABLE = {
    errors.LookerApiError: True,
    errors.LookStreamError: True,
    errors.LookQueryError: True,
    errors.QueryTaskError: True,
    errors.SegmentDeliveryError: True,
    errors.SyncStateError: True,
    errors.SyncStateLockedError: True,
    errors.SyncStateConflictError: True,
    errors.SyncStateSaveError: True,
    errors.SyncStateLockLostError: True,
    errors.LookerRequestError: False,
    errors.LookNotFoundError: False,
    errors.LookDeletedError: False,
    errors.QueryNotFoundError: False,
    errors.LookFilterError: False,
    errors.InvalidParameterError: False,
    errors.UndeliverableEventsError: False,
    errors.SyncStateCorruptError: False,
    errors.ExitGuardError: False,
    errors.TransformConfigError: False,
    errors.DestinationError: False,
    errors.SegmentConfigurationError: False,
    errors.ConnectionConfigError: False,
}


def test_every_error_class_is_in_the_table():
    classes = {
        value
        for value in vars(errors).values()
        if isinstance(value, type) and issubclass(value, errors.LookerSegmentError)
    }
    assert classes - {errors.LookerSegmentError} == set(TABLE)


@pytest.mark.parametrize("cls", list(TABLE), ids=lambda cls: cls.__name__)
def test_retried_or_failed_at_once(cls: type):
    from airflow.sdk.exceptions import AirflowFailException

    error = cls.__new__(cls)
    assert is_retryable(error) is TABLE[cls]
    assert isinstance(error, AirflowFailException) is not TABLE[cls]
    assert isinstance(error, errors.LookerSegmentError)  # callers catching the base still catch it


def test_invalid_parameters_are_still_value_errors():
    assert issubclass(errors.InvalidParameterError, ValueError)


# ------------------------------------------------------------------------- as the Looker hook raises them


def _raised(call) -> LookerApiError:
    with pytest.raises(LookerApiError) as caught:
        call()
    return caught.value


def test_rejected_credentials_fail_at_once(looker, make_hook):
    error = _raised(lambda: make_hook(looker.base_url, password=WRONG_SECRET).get_look(TOASTMATES_LOOK_ID))
    assert isinstance(error, LookerRequestError) and not is_retryable(error)
    assert "rejected the API credentials" in str(error)


@pytest.mark.parametrize(("status", "retryable"), [(405, False), (429, True), (503, True)])
def test_a_login_refused_for_another_reason_than_the_credentials(make_hook, looker, status, retryable):
    # Busy or upgrading (429, 5xx beyond the hook's retries): retried; another 4xx: no retry changes it.
    looker.fail_next_requests(10, path="/api/4.0/login", status=status, retry_after=0)
    error = _raised(lambda: make_hook(looker.base_url, retries=0).get_look(TOASTMATES_LOOK_ID))
    assert error.status == status and is_retryable(error) is retryable
    assert "Logging in to Looker" in str(error) and "Check the client ID" not in str(error)


def test_a_deleted_or_missing_look_fails_at_once(hook):
    assert not is_retryable(_raised(lambda: hook.get_look(DELETED_LOOK_ID)))
    assert not is_retryable(_raised(lambda: hook.get_look("424242")))


@pytest.mark.parametrize(("status", "retryable"), [(403, False), (400, False), (429, True), (503, True)])
def test_http_errors_of_a_run(hook, looker, status, retryable):
    looker.fail_next_runs(10, status=status, retry_after=0)  # beyond the hook's own retries
    error = _raised(lambda: stream_all(hook, TOASTMATES_LOOK_ID))
    assert error.status == status and is_retryable(error) is retryable
    assert isinstance(error, LookerRequestError) is not retryable


def test_a_result_that_breaks_off_is_retried(hook, looker):
    looker.cut_connection_after(TOASTMATES_LOOK_ID, 3)
    error = _raised(lambda: stream_all(hook, TOASTMATES_LOOK_ID))
    assert "connection closed" in str(error) and is_retryable(error)


def test_a_proxy_page_is_retried(hook, looker):
    looker.answer_html_next_runs(1)
    error = _raised(lambda: stream_all(hook, TOASTMATES_LOOK_ID))
    assert "not valid JSON" in str(error) and is_retryable(error)


def test_an_unreachable_looker_is_retried(make_hook, looker):
    url = looker.base_url
    looker.stop()
    error = _raised(lambda: make_hook(url, retries=0).get_look(TOASTMATES_LOOK_ID))
    assert "cannot reach" in str(error) and is_retryable(error)


def test_a_wrong_scheme_fails_at_once(make_hook, looker):
    url = looker.base_url.replace("http://", "https://")
    error = _raised(lambda: make_hook(url, retries=0).get_look(TOASTMATES_LOOK_ID))
    assert "plain HTTP" in str(error) and not is_retryable(error)


def test_an_untrusted_certificate_fails_at_once(make_hook, tmp_path):
    cert, key = make_self_signed_cert(tmp_path)
    with LookerStandIn(tls_certfile=cert, tls_keyfile=key) as tls:
        error = _raised(lambda: make_hook(tls.base_url, retries=0).get_look(TOASTMATES_LOOK_ID))
    assert "CERTIFICATE_VERIFY_FAILED" in str(error) and not is_retryable(error)
