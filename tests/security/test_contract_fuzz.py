"""Issue 10, case 5: schemathesis against the served contract, bounded and repeatable.

Every operation of ``api/openapi.yaml`` gets up to ``EXAMPLES`` generated requests
(valid and invalid ones), sent over real HTTP to the real app on an ephemeral
port with an admin token. A response fails the test when it is a 5xx, a status
the contract does not list for that operation, or a body or media type that
does not match it. ``derandomize`` makes every run draw the same cases.
"""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is in the test extra: pip install -e '.[test]'")

from api_support import OPENAPI, KnownSessions, start_service, stop_service  # noqa: E402
from hypothesis import HealthCheck, Phase, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

EXAMPLES = 150
# Not positive_data_acceptance: a schema-valid value refused for what no schema says (a time that does
# not parse, a path that does not exist) is a 4xx by design. Not negative_data_rejection: it takes any
# unknown query parameter for invalid; tests/security/test_contract_drift.py holds the cases it found.
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          unsupported_method]

schema = schemathesis.openapi.from_path(str(OPENAPI))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    # The omero importer config, so /ome/import validates its items instead of refusing them all;
    # no worker runs, so nothing is imported. The rate limit is raised: here it would only hide cases.
    service = start_service(tmp_path_factory.mktemp("fuzz"), importer="omero", session_checker=KnownSessions(),
                            extra_server={"seed_rate_per_minute": 1_000_000})
    yield service
    stop_service(service)


@schema.parametrize()
@settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
          phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
def test_every_operation_answers_as_the_contract_says(case, served):
    case.call_and_validate(base_url=served.server.url, checks=CHECKS,
                           headers={"Authorization": f"Bearer {served.tokens['admin']}"}, timeout=30)
