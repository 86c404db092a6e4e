"""deploy/ray-cluster.yaml (``ray up``) and deploy/kuberay.yaml (``kubectl apply``) are valid and agree
with the Tandem config they launch: parsed with yaml.safe_load, the cluster-launcher file checked
against Ray's own schema, every pool's labels / resources / GPUs provided by some node type or
worker group, the head runs ``tandem launch`` on a config file that deploy.config accepts.
The checkers return their problems as strings, so a broken manifest fails with a readable list; the
mutation tests show each checker does catch what it is for.
"""

from __future__ import annotations

import copy
import json
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploy.config import TandemConfig, load_config, parse_config

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
RAY_CLUSTER = REPO / "deploy" / "ray-cluster.yaml"
KUBERAY = REPO / "deploy" / "kuberay.yaml"


def _launch_file(commands: list[str]) -> str | None:
    """The FILE of the first ``tandem launch FILE`` among shell commands."""
    for cmd in commands:
        words = shlex.split(cmd.replace(";", " ; "))
        for i, w in enumerate(words[:-2]):
            if w == "tandem" and words[i + 1] == "launch":
                return words[i + 2]
    return None


def _pool_problems(
    cfg: TandemConfig, groups: dict[str, tuple[dict[str, str], dict[str, float], int]]
) -> list[str]:
    """groups: name -> (Ray labels, Ray resources per node, max nodes). Every pool must fit."""
    problems = []
    for role in ("prefill", "decode"):
        pool = getattr(cfg.pools, role)
        if pool.replicas == 0:
            continue
        fits = [
            (res, n)
            for labels, res, n in groups.values()
            if all(labels.get(k) == v for k, v in pool.node_labels.items())
            and all(res.get(k, 0) >= v for k, v in pool.resources.items())
        ]
        if not fits:
            problems.append(
                f"pools.{role}: no node type has labels {pool.node_labels} and resources {pool.resources}"
            )
            continue
        for name, need in (("GPU", pool.num_gpus), ("CPU", pool.num_cpus)):
            have = sum(res.get(name, 0) * n for res, n in fits)
            if have < need * pool.replicas:
                problems.append(
                    f"pools.{role}: {pool.replicas} workers need {need * pool.replicas} {name}, "
                    f"nodes have {have}"
                )
    named = {labels.get("tandem/node") for labels, _, _ in groups.values()}
    problems += [
        f"topology.nodes.{n}: no node is labelled tandem/node={n}"
        for n in cfg.topology.nodes
        if n not in named
    ]
    return problems


# -- ray up -------------------------------------------------------------------------------------------
def ray_cluster_problems(doc: dict[str, Any], repo: Path = REPO) -> list[str]:
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    problems = [f"schema: {e.message}" for e in jsonschema.Draft7Validator(schema).iter_errors(doc)]
    if problems:
        return problems
    target = _launch_file(doc.get("head_start_ray_commands", []))
    if target is None:
        return ["head_start_ray_commands: no `tandem launch FILE`"]
    if target not in doc.get("file_mounts", {}):
        return [f"file_mounts: the launched config {target} is not mounted"]
    cfg = load_config(repo / doc["file_mounts"][target])
    types = doc["available_node_types"]
    groups = {
        name: (dict(t.get("labels", {})), dict(t["resources"]), int(t.get("max_workers", 0)))
        for name, t in types.items()
        if name != doc["head_node_type"]
    }
    return _pool_problems(cfg, groups)


def test_ray_cluster_yaml_is_valid_and_fits_its_tandem_config() -> None:
    doc = yaml.safe_load(RAY_CLUSTER.read_text())
    assert ray_cluster_problems(doc) == []
    assert doc["file_mounts"] == {"/etc/tandem/tandem.yaml": "./deploy/examples/two-node-gpu.yaml"}


def test_ray_cluster_checker_catches_mismatches() -> None:
    doc = yaml.safe_load(RAY_CLUSTER.read_text())
    bad = copy.deepcopy(doc)
    bad["available_node_types"]["decode-h200"]["labels"]["tandem/gpu"] = "a100"
    assert ray_cluster_problems(bad) == [
        "pools.decode: no node type has labels {'tandem/gpu': 'h200'} and resources {}"
    ]
    bad = copy.deepcopy(doc)
    bad["available_node_types"]["prefill-h100"]["resources"]["GPU"] = 4
    assert ray_cluster_problems(bad) == ["pools.prefill: 8 workers need 8.0 GPU, nodes have 4"]
    bad = copy.deepcopy(doc)
    bad["available_node_types"]["prefill-h100"]["resources"]["GPU"] = "eight"
    assert ray_cluster_problems(bad) == ["schema: 'eight' is not of type 'integer'"]
    bad = copy.deepcopy(doc)
    bad["head_start_ray_commands"] = bad["head_start_ray_commands"][:2]
    assert ray_cluster_problems(bad) == ["head_start_ray_commands: no `tandem launch FILE`"]


# -- kubectl apply ------------------------------------------------------------------------------------
def kuberay_problems(docs: list[dict[str, Any]]) -> list[str]:
    from ray._private.label_utils import parse_node_labels_string

    by_kind = {d["kind"]: d for d in docs}
    if sorted(by_kind) != ["ConfigMap", "RayJob", "Service"]:
        return [f"kinds: {sorted(by_kind)}"]
    cm, job, svc = by_kind["ConfigMap"], by_kind["RayJob"], by_kind["Service"]
    problems = []
    if job["apiVersion"] != "ray.io/v1":
        problems.append(f"RayJob.apiVersion: {job['apiVersion']}")
    if job["spec"].get("shutdownAfterJobFinishes") is not False:
        problems.append(
            "RayJob.spec.shutdownAfterJobFinishes must be false: the launched system outlives the job"
        )
    target = _launch_file([job["spec"]["entrypoint"]])
    if target is None:
        return [*problems, "RayJob.spec.entrypoint: not `tandem launch FILE`"]
    spec = job["spec"]["rayClusterSpec"]
    head = spec["headGroupSpec"]
    volumes = {v["name"]: v for v in head["template"]["spec"].get("volumes", [])}
    mounts = {
        m["mountPath"]: m["name"]
        for c in head["template"]["spec"]["containers"]
        for m in c.get("volumeMounts", [])
    }
    mount_dir, key = str(Path(target).parent), Path(target).name
    cm_name = volumes.get(mounts.get(mount_dir, ""), {}).get("configMap", {}).get("name")
    if cm_name != cm["metadata"]["name"] or key not in cm["data"]:
        return [*problems, f"head: {target} is not the ConfigMap {cm['metadata']['name']}'s data mounted"]
    cfg = parse_config(yaml.safe_load(cm["data"][key]), f"ConfigMap/{cm_name}/{key}")
    parse_node_labels_string(head["rayStartParams"].get("labels", ""))  # raises on bad syntax
    groups = {}
    for g in spec["workerGroupSpecs"]:
        params = g["rayStartParams"]
        gpus = int(params.get("num-gpus", "0"))
        for c in g["template"]["spec"]["containers"]:
            if int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) != gpus:
                problems.append(f"{g['groupName']}: num-gpus {gpus} but the pod asks for another GPU count")
        cpus = float(params.get("num-cpus", c["resources"]["limits"]["cpu"]))
        res = {"GPU": float(gpus), "CPU": cpus, **json.loads(params.get("resources", "{}"))}
        groups[g["groupName"]] = (
            parse_node_labels_string(params.get("labels", "")),
            res,
            int(g["maxReplicas"]),
        )
    problems += _pool_problems(cfg, groups)
    head_labels = head["template"]["metadata"]["labels"]
    if any(head_labels.get(k) != v for k, v in svc["spec"]["selector"].items()):
        problems.append("Service.spec.selector does not select the head pod")
    ports = [cfg.router.port] + ([cfg.router.http.port] if cfg.router.http.enabled else [])
    if [p["targetPort"] for p in svc["spec"]["ports"]] != ports:
        problems.append(f"Service: targetPorts are not router.port and router.http.port {ports}")
    return problems


def test_kuberay_yaml_is_valid_and_fits_its_tandem_config() -> None:
    docs = list(yaml.safe_load_all(KUBERAY.read_text()))
    assert kuberay_problems(docs) == []
    cfg = parse_config(yaml.safe_load(docs[0]["data"]["tandem.yaml"]))
    example = load_config(REPO / "deploy" / "examples" / "two-node-gpu.yaml")
    assert (cfg.pools, cfg.topology.nodes, cfg.model) == (
        example.pools,
        example.topology.nodes,
        example.model,
    )


def test_kuberay_checker_catches_mismatches() -> None:
    docs = list(yaml.safe_load_all(KUBERAY.read_text()))
    bad = copy.deepcopy(docs)
    bad[1]["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["rayStartParams"]["labels"] = "tandem/gpu=h200"
    assert kuberay_problems(bad) == [
        "pools.prefill: no node type has labels {'tandem/gpu': 'h100'} and resources {}",
        "topology.nodes.h100-0: no node is labelled tandem/node=h100-0",
    ]
    bad = copy.deepcopy(docs)
    bad[1]["spec"]["rayClusterSpec"]["workerGroupSpecs"][1]["template"]["spec"]["containers"][0]["resources"][
        "limits"
    ]["nvidia.com/gpu"] = 4
    assert kuberay_problems(bad) == ["decode-h200: num-gpus 8 but the pod asks for another GPU count"]
    bad = copy.deepcopy(docs)
    bad[0]["data"]["tandem.yaml"] = bad[0]["data"]["tandem.yaml"].replace("replicas: 8", "replicas: -1", 1)
    with pytest.raises(
        ValueError, match="pools.prefill.replicas: Input should be greater than or equal to 0"
    ):
        kuberay_problems(bad)
    bad = copy.deepcopy(docs)
    bad[1]["spec"]["shutdownAfterJobFinishes"] = True
    assert kuberay_problems(bad) == [
        "RayJob.spec.shutdownAfterJobFinishes must be false: the launched system outlives the job"
    ]


def test_the_status_table() -> None:
    from deploy.status import ClusterStatus, WorkerStatus, format_table

    st = ClusterStatus(
        "tandem",
        {
            "address": "10.0.0.1:50051",
            "http_url": "http://10.0.0.1:8000",
            "serving": True,
            "in_flight": 2,
            "policy": "cost_model",
            "node_id": "ab" * 20,
        },
        [
            WorkerStatus(
                "prefill-0",
                "prefill",
                "alive",
                "cd" * 20,
                "h100-0",
                1,
                0,
                30,
                12,
                48,
                3,
                128,
                3 << 19,
                64 << 20,
            ),
            WorkerStatus("decode-0", "decode", "unreachable"),
        ],
    )
    lines = format_table(st).splitlines()
    assert lines[:2] == [
        "router   10.0.0.1:50051  http=http://10.0.0.1:8000  serving=True  in_flight=2  policy=cost_model"
        "  node=abababababab",
        "",
    ]
    # columns aligned: each starts where its header does
    starts = [lines[2].index(h) for h in ("WORKER", "NODE_ID", "STATE", "G1_BLOCKS", "G1_USE", "G3_MIB")]
    assert starts == [9, 28, 42, 84, 95, 114]
    assert [line.split() for line in lines[2:]] == [
        [
            "POOL",
            "WORKER",
            "NODE",
            "NODE_ID",
            "STATE",
            "RUNNING",
            "WAITING",
            "QUEUE_TOK",
            "G1_BLOCKS",
            "G1_USE",
            "G2_BLOCKS",
            "G3_MIB",
            "TP",
        ],
        [
            "prefill",
            "prefill-0",
            "h100-0",
            "cdcdcdcdcdcd",
            "alive",
            "1",
            "0",
            "30",
            "12/48",
            "25.0%",
            "3/128",
            "1.5/64",
            "1",
        ],
        ["decode", "decode-0", "-", "-", "unreachable", "0", "0", "0", "0/0", "-", "-", "-", "1"],
    ]
    assert [lines[3][i:].split()[0] for i in starts] == [
        "prefill-0",
        "cdcdcdcdcdcd",
        "alive",
        "12/48",
        "25.0%",
        "1.5/64",
    ]
    assert format_table(ClusterStatus("x")).splitlines()[0] == "router   not launched in namespace 'x'"
