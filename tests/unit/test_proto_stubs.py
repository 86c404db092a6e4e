"""The committed tandem.v1 stubs are what proto/generate.py makes from tandem.proto today."""

from __future__ import annotations

from pathlib import Path

import pytest

from proto import generate as gen

pytestmark = pytest.mark.unit


def test_committed_stubs_are_not_stale(tmp_path: Path) -> None:
    written = gen.generate(tmp_path)
    assert len(written) == 3
    for proto_file in gen.PROTO_FILES:
        fresh = gen.stub_paths(proto_file, tmp_path)
        committed = gen.stub_paths(proto_file, gen.PROTO_ROOT)
        for new, old in zip(fresh, committed, strict=True):
            assert old.exists(), f"{old} is missing: run `make proto`"
            assert new.read_text() == old.read_text(), f"{old} is stale: run `make proto` and commit"


def test_stubs_import_package_relative() -> None:
    from proto.tandem.v1 import tandem_pb2, tandem_pb2_grpc

    assert tandem_pb2.DESCRIPTOR.package == "tandem.v1"
    service = tandem_pb2.DESCRIPTOR.services_by_name["Tandem"]
    assert [m.name for m in service.methods] == ["Generate", "GetModelInfo", "GetServerInfo"]
    assert service.methods_by_name["Generate"].server_streaming
    assert not service.methods_by_name["GetModelInfo"].server_streaming
    assert hasattr(tandem_pb2_grpc, "TandemStub") and hasattr(tandem_pb2_grpc, "TandemServicer")


def test_generate_request_round_trips() -> None:
    from proto.tandem.v1 import tandem_pb2 as pb

    req = pb.GenerateRequest(
        model="demo",
        token_ids=pb.TokenIds(ids=[1, 2, 3]),
        sampling=pb.SamplingParams(max_tokens=8, temperature=0.5, seed=7, stop=["\n"]),
        request_id="r1",
        disaggregation=pb.DISAGGREGATION_NEVER,
    )
    back = pb.GenerateRequest.FromString(req.SerializeToString())
    assert back.WhichOneof("prompt") == "token_ids"
    assert list(back.token_ids.ids) == [1, 2, 3]
    assert back.sampling.HasField("seed") and back.sampling.seed == 7
    assert not back.sampling.HasField("logprobs")
    assert back.disaggregation == pb.DISAGGREGATION_NEVER
