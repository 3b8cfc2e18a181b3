"""
Benchmark child: the Looker stand-in's ceiling, and the body the floor reads.

Logs in and downloads a Look's ``json_detail`` result with the query parameters LookerHook uses
(``apply_formatting=false``, ``apply_vis=false``, ``cache=true``, ``limit=-1``) through ``requests``,
reading the raw body in 128 KB pieces as the hook's parser does, and writes it to ``body_path``. No parsing:
the rows per second measured are how fast the stand-in serves rows (and this client takes them).

Config (JSON argument): ``look_id``, ``looker_url``, ``client_id``, ``client_secret``, ``body_path``.
"""

from __future__ import annotations

from probe import Probe, read_config

PROBE = Probe()

import requests  # noqa: E402

READ_SIZE = 128 * 1024


def main() -> None:
    """Download the body once; print the measurements and its size."""
    config = read_config()
    base = config["looker_url"].rstrip("/")
    PROBE.mark("imported")
    size = 0
    with requests.Session() as session:
        login = session.post(
            f"{base}/api/4.0/login",
            data={"client_id": config["client_id"], "client_secret": config["client_secret"]},
            timeout=60,
        )
        login.raise_for_status()
        headers = {"Authorization": f"Bearer {login.json()['access_token']}"}
        params = {"apply_formatting": "false", "apply_vis": "false", "cache": "true", "limit": "-1"}
        url = f"{base}/api/4.0/looks/{config['look_id']}/run/json_detail"
        with session.get(url, params=params, headers=headers, stream=True, timeout=600) as response:
            response.raise_for_status()
            raw = response.raw
            raw.decode_content = True
            with open(config["body_path"], "wb") as out:
                while True:
                    data = raw.read1(READ_SIZE)
                    if not data:
                        break
                    size += len(data)
                    out.write(data)
    PROBE.mark("done")
    PROBE.emit(body_bytes=size)


if __name__ == "__main__":
    main()
