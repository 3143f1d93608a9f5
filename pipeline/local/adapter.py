"""Points this process's Google clients, Beam's included, at the local stack.

Why it exists: Beam 2.77 has no option for a BigQuery endpoint. ``BigQueryWrapper`` builds an
apitools ``BigqueryV2`` client hard-wired to bigquery.googleapis.com (table get/create) plus a
``google.cloud.bigquery.Client`` (streaming inserts) that asks google-auth for credentials, which
on a machine without them ends in a metadata-server probe or an interactive OAuth flow. Pub/Sub,
GCS and GDAL do honour environment variables, so for them this only sets the environment.

It is applied only when the local stack is selected and the runner runs in this process
(``BundleBasedDirectRunner``/``DirectRunner``); ``pipeline.main`` refuses ``--local`` with any other
runner, so it can never reach Dataflow workers.
"""

from __future__ import annotations

import functools
import os

from pipeline.local.stack import LocalStack

_applied: LocalStack | None = None
LOCAL_RUNNERS = ("BundleBasedDirectRunner", "DirectRunner", "SwitchingDirectRunner")


def applied_stack() -> LocalStack | None:
    """The stack this process is pointed at, or None when the real services are in use."""
    return _applied


def apply(stack: LocalStack) -> None:
    global _applied
    from apache_beam.internal.gcp import auth
    from apache_beam.internal.http_client import get_new_http
    from apache_beam.io.gcp import bigquery_tools
    from apache_beam.io.gcp.internal.clients import bigquery as bq_api
    from google.api_core.client_options import ClientOptions
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import bigquery

    os.environ.update(stack.env())
    # Beam's GCS/Pub/Sub helpers ask google-auth first and back off for ~15 s when no
    # credentials exist; emulators need none, so answer "anonymous" up front.
    with auth._Credentials._credentials_lock:
        auth._Credentials._credentials = None
        auth._Credentials._credentials_init = True

    def emulator_apitools_client(_pipeline_options=None):
        return bq_api.BigqueryV2(
            url=f"{stack.bigquery_url}/bigquery/v2/",
            http=get_new_http(),
            get_credentials=False,
            credentials=None,
            response_encoding="utf8",
        )

    bigquery_tools.BigQueryWrapper._bigquery_client = staticmethod(emulator_apitools_client)
    bigquery_tools.gcp_bigquery = _EmulatorBigQueryModule(
        functools.partial(
            bigquery.Client,
            project=stack.project,
            credentials=AnonymousCredentials(),
            client_options=ClientOptions(api_endpoint=stack.bigquery_url),
        )
    )
    _applied = stack


class _EmulatorBigQueryModule:
    """Stands in for the ``google.cloud.bigquery`` module inside Beam's bigquery_tools.

    Only ``Client`` differs (bound to the emulator with anonymous credentials); every other
    attribute is the real module's.
    """

    def __init__(self, client_factory):
        from google.cloud import bigquery

        self._module = bigquery
        self.Client = client_factory

    def __getattr__(self, name):
        return getattr(self._module, name)
