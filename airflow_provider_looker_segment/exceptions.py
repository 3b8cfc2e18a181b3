"""Exceptions raised by the provider. Every message names the cause and what to do about it."""

from __future__ import annotations

from airflow.sdk.exceptions import AirflowException


class LookerSegmentError(AirflowException):
    """Base class of every error this provider raises."""


class LookerApiError(LookerSegmentError):
    """
    A Looker API call failed.

    :param message: what went wrong, in words a user can act on (never a secret).
    :param status: the HTTP status when it is known.
    :param look_id: the Look concerned, if any.
    """

    def __init__(self, message: str, *, status: int | None = None, look_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.look_id = look_id


class LookNotFoundError(LookerApiError):
    """The Look does not exist or the API user cannot see it."""


class LookDeletedError(LookerApiError):
    """The Look is in the trash."""


class LookQueryError(LookerApiError):
    """Looker ran the Look's SQL and it failed (HTTP 200 with a ``looker_error`` row)."""


class LookStreamError(LookerApiError):
    """The result body ended early or could not be parsed."""


class LookTruncatedError(LookerApiError):
    """The result has as many rows as the limit in effect and strict truncation checks were asked for."""


class SegmentConfigurationError(LookerSegmentError):
    """The Segment connection or the delivery settings are unusable (e.g. no write key)."""


class SegmentDeliveryError(LookerSegmentError):
    """Some events were rejected by Segment or could not be delivered."""


class TransformConfigError(LookerSegmentError):
    """The Look's fields and the operator's settings do not give a usable row → identify mapping."""


class DestinationError(LookerSegmentError):
    """The requested Segment destinations are unknown or need identifiers the Look does not provide."""


class InvalidParameterError(LookerSegmentError, ValueError):
    """An operator argument (after template rendering) has a value that cannot be used."""


class ConnectionConfigError(LookerSegmentError):
    """An Airflow connection's fields (Host, Login, Password) cannot be used."""
