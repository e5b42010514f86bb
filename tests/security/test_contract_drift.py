"""Issue 10 (second round), finding G: where schemathesis (``--checks all``) found the contract and
the behaviour apart; the stricter behaviour kept, the schema made to say it. Real HTTP; every answer
is also checked against ``api/openapi.yaml`` by the test client."""

from __future__ import annotations

import pytest
import yaml
from api_support import OPENAPI, acquisition, start_service, stop_service


@pytest.fixture(scope="module")
def svc(tmp_path_factory):
    service = start_service(tmp_path_factory.mktemp("drift"))
    yield service
    stop_service(service)


@pytest.fixture(scope="module")
def contract():
    return yaml.safe_load(OPENAPI.read_text(encoding="utf-8"))


@pytest.mark.parametrize("query", ["since=", "until=", "cursor="])
def test_empty_list_filters_are_422_and_the_schema_says_so(svc, contract, query):
    r = svc.client("admin").get(f"/api/v1/jobs?{query}")
    assert r.status == 422 and r.json["detail"][0]["field"] == query[:-1]
    (param,) = [p for p in contract["paths"]["/api/v1/jobs"]["get"]["parameters"] if p.get("name") == query[:-1]]
    assert param["schema"].get("minLength") == 1 or "pattern" in param["schema"]


def test_empty_throughput_hours_is_422_as_the_enum_says(svc):
    r = svc.client("admin").get("/api/v1/throughput?hours=")
    assert r.status == 422 and r.json["detail"][0]["field"] == "hours"
    assert svc.client("admin").get("/api/v1/throughput").status == 200


def test_an_empty_session_key_is_422_and_the_schema_says_so(svc, contract):
    folder = acquisition(svc.roots["drop"], "sk")
    r = svc.client("admin").post("/api/v1/jobs", {"path": str(folder), "session_key": ""})
    assert r.status == 422
    assert contract["components"]["schemas"]["JobRequest"]["properties"]["session_key"]["minLength"] == 1


@pytest.mark.parametrize("field", ["experimenterEmail", "targetUri", "omeroHost", "sessionKey"])
def test_seed_required_texts_may_not_be_empty_in_the_schema(contract, field):
    assert contract["components"]["schemas"]["SeedImportRequest"]["properties"][field]["minLength"] == 1


@pytest.mark.parametrize("path", ["/ome/import/%2Fome%2Ffailed%2Fimport%2F5", "/ome/failed/import/a%2Fb",
                                  "/ome/failed/mail/1%2F2"])
def test_an_id_with_a_slash_is_404_as_text_like_any_unknown_id(svc, path):
    r = svc.client("admin").get(path)  # the client checks: text/plain is what the contract documents
    assert r.status == 404 and r.headers["content-type"].startswith("text/plain")


# Outside test a10 F5: schemathesis (--checks all) sent schema-valid requests that were 422.


def _time_pattern(contract, name):
    (param,) = [p for p in contract["paths"]["/api/v1/jobs"]["get"]["parameters"] if p.get("name") == name]
    return param["schema"]["pattern"]


@pytest.mark.parametrize("name", ["since", "until"])
def test_every_time_the_schema_allows_is_accepted(svc, contract, name):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from watchfolder.web.api import parse_time

    pattern = _time_pattern(contract, name)
    assert parse_time("2026-11-28T10:00:00Z", name) and parse_time("1764324000", name)

    @settings(max_examples=300, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
    @given(st.from_regex(pattern, fullmatch=True))
    def accepted(value):
        parse_time(value, name)  # a 422 (ApiError) fails the test

    accepted()
    for value in ("2026-02-28 23:59", "-86400.5", "2026-11-28T10:00:00.5+01:00"):
        r = svc.client("admin").get(f"/api/v1/jobs?{name}={value.replace('+', '%2B').replace(' ', '%20')}")
        assert r.status == 200, (value, r.json)
    r = svc.client("admin").get(f"/api/v1/jobs?{name}=yesterday")
    assert r.status == 422 and r.json["detail"][0]["field"] == name


def test_an_unknown_watch_is_422_and_the_schema_says_why_no_schema_can_list_them(svc, contract):
    r = svc.client("admin").get("/api/v1/pending?watch=0")
    assert r.status == 422 and r.json["detail"][0]["field"] == "watch"
    (param,) = [p for p in contract["paths"]["/api/v1/pending"]["get"]["parameters"] if p.get("name") == "watch"]
    assert "422" in param["description"] and "configuration" in param["description"]
    assert "422" in contract["paths"]["/api/v1/pending"]["get"]["responses"]


def test_a_session_key_on_an_archive_server_is_422_as_the_schema_says(svc, contract):
    folder = acquisition(svc.roots["drop"], "sk-archive")
    r = svc.client("admin").post("/api/v1/jobs", {"path": str(folder), "session_key": "abc"})
    assert r.status == 422 and any(p["field"] == "session_key" for p in r.json["detail"] or []), r.json
    described = contract["components"]["schemas"]["JobRequest"]["properties"]["session_key"]["description"]
    assert "archive" in described and "422" in described
