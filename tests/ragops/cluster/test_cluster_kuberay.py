"""KubeRay manifests: valid against the official CRDs (strict), sized by settings, no secret values."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from ragops.cluster.envconfig import settings_env, settings_from_env, settings_overrides
from ragops.cluster.kuberay import (
    RenderOptions,
    SecretEnv,
    parse_secret_env,
    render_cluster,
    render_job,
    render_service,
    secret_refs,
    serve_config_v2,
    to_yaml,
)
from ragops.cluster.resources import (
    JOB_KINDS,
    SERVE_DEPLOYMENTS,
    Demand,
    PodShape,
    Shapes,
    pack,
    plan_groups,
    serve_deployments,
)
from ragops.config import load_settings
from ragops.errors import ConfigError
from tests.ragops.cluster._helpers import REPO, cluster_cli

CLUSTER_YAML = REPO / "configs" / "cluster.yaml"
EXAMPLES = REPO / "configs" / "kuberay"
JOB_ARGS = {
    "ingest": [],  # the documents come from ingest.sources in configs/cluster.yaml
    "train-sft": ["--data", "/mnt/ragops/datasets/sft.jsonl"],
    "train-reward": ["--data", "/mnt/ragops/datasets/preferences.jsonl"],
    "eval": ["answers", "--data", "/opt/ragops/samples/eval/answers.jsonl"],
    "loop": ["prod", "--eval-data", "/opt/ragops/samples/eval/answers.jsonl"],
}
#: Shipped example → the `ragops kuberay render` arguments that produce it (from the repo root).
EXAMPLE_COMMANDS = {
    **{
        f"rayjob-{kind}.yaml": ["--job", kind, "--config", "configs/cluster.yaml", "--data-pvc", "ragops-data", *(["--", *args] if args else [])]
        for kind, args in JOB_ARGS.items()
    },
    "rayservice.yaml": ["--service", "--config", "configs/cluster.yaml", "--data-pvc", "ragops-data"],
    "raycluster.yaml": ["--cluster", "--config", "configs/cluster.yaml", "--data-pvc", "ragops-data"],
}


@pytest.fixture(scope="module")
def cluster_settings() -> Any:
    return load_settings([CLUSTER_YAML], environ={})


def _opts(**kw: Any) -> RenderOptions:
    return RenderOptions(data_pvc="ragops-data", **kw)


def _all_manifests(settings: Any, opts: RenderOptions) -> list[dict[str, Any]]:
    jobs = [render_job(settings, kind, JOB_ARGS[kind], opts) for kind in JOB_KINDS]
    return [*jobs, render_service(settings, opts), render_cluster(settings, opts)]


def _containers(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    spec = manifest["spec"]
    rc = spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec
    groups = [rc["headGroupSpec"], *rc["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def _group(manifest: dict[str, Any], name: str) -> dict[str, Any] | None:
    spec = manifest["spec"]
    rc = spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec
    return next((g for g in rc["workerGroupSpecs"] if g["groupName"] == name), None)


# -- validity against the CRDs -----------------------------------------------------------


def test_every_rendered_manifest_validates_strictly(crds: Any, cluster_settings: Any) -> None:
    for manifest in _all_manifests(cluster_settings, _opts(namespace="ml", secret_env=[SecretEnv("HF_TOKEN", "hf", "token")])):
        # Through YAML and back, as kubectl would read it.
        doc = yaml.safe_load(to_yaml(manifest, _opts()))
        assert crds.errors(doc) == [], (manifest["kind"], crds.errors(doc))


def test_every_shipped_kuberay_file_validates_strictly(crds: Any) -> None:
    files = sorted(EXAMPLES.glob("*.yaml"))
    assert {f.name for f in files} == set(EXAMPLE_COMMANDS), "configs/kuberay/ and EXAMPLE_COMMANDS disagree"
    for f in files:
        docs = [d for d in yaml.safe_load_all(f.read_text()) if d]
        assert len(docs) == 1, f"{f.name}: one document per file (configs/ YAMLs are read as single documents)"
        assert crds.errors(docs[0]) == [], (f.name, crds.errors(docs[0]))


def test_shipped_examples_are_what_render_prints_now(monkeypatch: pytest.MonkeyPatch) -> None:
    runner = CliRunner()
    app = cluster_cli()
    monkeypatch.chdir(REPO)  # the commands name configs/cluster.yaml relative to the repository root
    for name, args in EXAMPLE_COMMANDS.items():
        result = runner.invoke(app, ["kuberay", "render", *args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        cut = args.index("--") if "--" in args else len(args)
        cmd = shlex.join(["ragops", "kuberay", "render", *args[:cut], "--output", f"configs/kuberay/{name}", *args[cut:]])
        assert result.stdout == (EXAMPLES / name).read_text(), f"configs/kuberay/{name} is stale: re-render with `{cmd}`"


def test_validator_catches_typos_and_wrong_kinds(crds: Any, cluster_settings: Any) -> None:
    job = yaml.safe_load(to_yaml(render_job(cluster_settings, "ingest", ["docs"], _opts()), _opts()))
    job["spec"]["entryPoint"] = job["spec"].pop("entrypoint")  # unknown field: only strict rejects it
    assert any("[strict]" in e and "entryPoint" in e for e in crds.errors(job))
    assert crds.errors({**job, "apiVersion": "ray.io/v1alpha1"})
    bad = yaml.safe_load(to_yaml(render_cluster(cluster_settings, _opts()), _opts()))
    bad["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # must be a string
    assert any("num-cpus" in e for e in crds.errors(bad))


# -- content -----------------------------------------------------------------------------


def test_rayjob_shape(cluster_settings: Any) -> None:
    job = render_job(cluster_settings, "ingest", ["s3://bucket/docs", "--prune"], _opts(ttl_s=120, deadline_s=3600))
    spec = job["spec"]
    assert spec["entrypoint"] == "ragops ingest s3://bucket/docs --prune"
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] == 120
    assert spec["activeDeadlineSeconds"] == 3600
    rc = spec["rayClusterSpec"]
    assert rc["enableInTreeAutoscaling"] is True
    assert rc["headGroupSpec"]["rayStartParams"] == {"num-cpus": "0"}
    gpu = _group(job, "gpu-workers")
    # 4 embedding actors x 0.25 GPU (2 CPUs each) fit one 8-CPU, 1-GPU pod.
    assert gpu is not None and (gpu["minReplicas"], gpu["replicas"], gpu["maxReplicas"]) == (0, 1, 1)
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1"
    assert gpu["template"]["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"


def test_gpu_group_only_when_config_asks_for_gpus(cluster_settings: Any) -> None:
    cpu_only = load_settings([CLUSTER_YAML], ["ingest.gpus_per_actor=0", "ingest.embed_actors=6"], environ={})
    job = render_job(cpu_only, "ingest", ["docs"], _opts())
    assert _group(job, "gpu-workers") is None
    cpu = _group(job, "cpu-workers")
    # 6 actors x 2 CPUs + 1 load task on 4-CPU pods: 4 pods.
    assert cpu is not None and cpu["maxReplicas"] == 4
    assert all("nvidia.com/gpu" not in c["resources"]["limits"] for c in _containers(job))
    train = render_job(cluster_settings, "train-sft", [], _opts())
    assert _group(train, "gpu-workers")["maxReplicas"] == 2  # finetune.workers=2, one GPU each
    no_gpu_train = load_settings([CLUSTER_YAML], ["finetune.use_gpu=false"], environ={})
    assert _group(render_job(no_gpu_train, "train-sft", [], _opts()), "gpu-workers") is None


def test_eval_driver_runs_where_its_gpu_is(cluster_settings: Any) -> None:
    job = render_job(cluster_settings, "eval", ["answers", "--data", "f.jsonl"], _opts())
    assert job["spec"]["entrypointNumGpus"] == 1.0
    cpu_eval = load_settings([CLUSTER_YAML], ["generator.device=cpu"], environ={})
    assert "entrypointNumGpus" not in render_job(cpu_eval, "eval", ["retrieval"], _opts())["spec"]


def test_service_follows_serve_autoscaling(cluster_settings: Any) -> None:
    svc = render_service(cluster_settings, _opts())
    serve_cfg = yaml.safe_load(svc["spec"]["serveConfigV2"])
    app = serve_cfg["applications"][0]
    assert app["import_path"] == "ragops.serve.app:build_app"
    deps = {d["name"]: d for d in app["deployments"]}
    assert set(deps) == set(SERVE_DEPLOYMENTS.values())
    gen = deps["Generator"]
    assert gen["ray_actor_options"] == {"num_cpus": 2.0, "num_gpus": 1.0}
    assert gen["autoscaling_config"]["max_replicas"] == 4
    gpu = _group(svc, "gpu-workers")
    assert gpu is not None and (gpu["minReplicas"], gpu["maxReplicas"]) == (1, 4)  # generator min 1 .. max 4
    # The settings travel as build_app's `set`, and reproduce them exactly.
    back = load_settings([], app["args"]["set"], environ={})
    assert back == cluster_settings


def test_service_lists_the_reranker_only_when_one_is_configured(cluster_settings: Any) -> None:
    def deployments(settings: Any) -> dict[str, Any]:
        app = yaml.safe_load(render_service(settings, _opts())["spec"]["serveConfigV2"])["applications"][0]
        return {d["name"]: d for d in app["deployments"]}

    assert "Reranker" not in deployments(cluster_settings)  # Ray Serve refuses a deployment the app lacks
    reranking = load_settings(
        [CLUSTER_YAML],
        ["retrieval.rerank.model=bge-reranker-base", "serve.reranker.num_gpus=0.5", "serve.reranker.num_cpus=1",
         "serve.reranker.autoscaling.max_replicas=3", "serve.reranker.max_ongoing_requests=24"],
        environ={},
    )  # fmt: skip
    deps = deployments(reranking)
    assert list(deps) == ["Ingress", "QueryEmbedder", "Retriever", "Reranker", "Generator"]
    rr = deps["Reranker"]
    assert rr["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0.5}
    assert rr["autoscaling_config"]["max_replicas"] == 3 and rr["max_ongoing_requests"] == 24
    # Its replicas are sized into the GPU group: 4 generators (1 GPU) + 3 rerankers (0.5 GPU) on 1-GPU pods.
    svc = render_service(reranking, _opts())
    assert _group(svc, "gpu-workers")["maxReplicas"] == 6
    back = load_settings([], yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"][0]["args"]["set"], environ={})
    assert back == reranking


def test_serve_config_is_valid_for_ray_serve(cluster_settings: Any) -> None:
    schema = pytest.importorskip("ray.serve.schema")
    cfg = schema.ServeDeploySchema.model_validate(serve_config_v2(cluster_settings))
    assert cfg.applications[0].import_path == "ragops.serve.app:build_app"


def test_deployment_names_match_the_serve_app() -> None:
    try:
        from ragops.serve.embedder import QueryEmbedder
        from ragops.serve.generator import GeneratorDeployment
        from ragops.serve.ingress import Ingress
        from ragops.serve.reranker import RerankerDeployment
        from ragops.serve.retriever import RetrieverDeployment
    except ImportError as exc:  # pragma: no cover - serve app not importable here
        pytest.skip(f"ragops.serve not importable: {exc}")
    names = {d.name for d in (Ingress, QueryEmbedder, RetrieverDeployment, GeneratorDeployment)}
    assert names == set(SERVE_DEPLOYMENTS.values())
    reranking = load_settings([], ["retrieval.rerank.model=bge-reranker-base"], environ={})
    assert set(serve_deployments(reranking).values()) == names | {RerankerDeployment.name}


def test_secrets_are_references_never_values(cluster_settings: Any) -> None:
    opts = _opts(secret_env=parse_secret_env(["AWS_ACCESS_KEY_ID", "HF_TOKEN=hf:token"], "ragops-secrets"))
    for manifest in _all_manifests(cluster_settings, opts):
        for c in _containers(manifest):
            env = {e["name"]: e for e in c.get("env", [])}
            for name in ("RAY_AUTH_TOKEN", "QDRANT_API_KEY", "AWS_ACCESS_KEY_ID", "HF_TOKEN"):
                assert "value" not in env[name] and "secretKeyRef" in env[name]["valueFrom"]
            assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert manifest["spec"].get("rayClusterSpec", manifest["spec"].get("rayClusterConfig", manifest["spec"]))[
            "authOptions"
        ] == {"mode": "token", "secretName": "ragops-ray-auth"}
    refs = secret_refs(render_service(cluster_settings, opts))
    assert refs["ragops-ray-auth"] == {"auth_token": False}
    assert refs["ragops-secrets"]["api-keys-chat"] is False  # the API is not open by default
    assert refs["ragops-secrets"]["aws-access-key-id"] is True
    assert refs["hf"] == {"token": True}
    insecure = secret_refs(render_service(cluster_settings, _opts(insecure=True)))
    assert insecure["ragops-secrets"]["api-keys-chat"] is True
    no_auth = render_cluster(cluster_settings, _opts(ray_auth_secret=None))
    assert "authOptions" not in no_auth["spec"]
    assert all(e["name"] != "RAY_AUTH_TOKEN" for c in _containers(no_auth) for e in c.get("env", []))


def test_config_travels_as_env_and_round_trips(cluster_settings: Any) -> None:
    job = render_job(cluster_settings, "ingest", ["docs"], _opts())
    env = [(e["name"], e["value"]) for e in _containers(job)[0]["env"] if e["name"].startswith("RAGOPS_")]
    # The settings, then the autoscaler's presence (runtime.autoscaling) that every rendered cluster has.
    assert env[-1] == ("RAGOPS_RUNTIME__AUTOSCALING", "on")
    assert env[:-1] == settings_env(cluster_settings)
    assert settings_from_env(env[:-1]) == cluster_settings
    assert settings_from_env(env).runtime.autoscaling == "on"
    assert ("RAGOPS_HOME", "/mnt/ragops") in env
    mounts = {m["mountPath"]: m["name"] for m in _containers(job)[0]["volumeMounts"]}
    assert mounts["/mnt/ragops"] == "ragops-data" and mounts["/dev/shm"] == "dshm"


def test_env_values_survive_yaml_quirks() -> None:
    s = load_settings(
        [],
        ["generator.stop=['on', 'null', '1.0']", "embedder.query_instruction=' padded '", "serve.generator.adapters={'Big': 'x'}"],
        environ={},
    )
    pairs = settings_env(s)
    assert settings_from_env(pairs) == s
    assert load_settings([], [f"{k}={v}" for k, v in settings_overrides(s)], environ={}) == s


def test_embedded_store_is_refused() -> None:
    s = load_settings([], [], environ={})
    for render in (lambda o: render_job(s, "ingest", ["d"], o), lambda o: render_service(s, o), lambda o: render_cluster(s, o)):
        with pytest.raises(ConfigError, match="Qdrant server"):
            render(_opts())


def test_bundle_larger_than_a_pod_is_a_clear_error(cluster_settings: Any) -> None:
    s = load_settings([CLUSTER_YAML], ["finetune.cpus_per_worker=12"], environ={})
    with pytest.raises(ConfigError, match="finetune.cpus_per_worker.*gpu-worker-cpus"):
        render_job(s, "train-sft", [], _opts())


def test_bad_job_arguments_and_names(cluster_settings: Any) -> None:
    # Without arguments an ingest job reads ingest.sources (set by the cluster preset) ...
    assert render_job(cluster_settings, "ingest", [], _opts())["spec"]["entrypoint"] == "ragops ingest"
    # ... and without either it is refused with what to do.
    no_sources = cluster_settings.model_copy(
        update={"ingest": cluster_settings.ingest.model_copy(update={"sources": []})}
    )
    with pytest.raises(ConfigError, match="paths or URIs"):
        render_job(no_sources, "ingest", [], _opts())
    with pytest.raises(ConfigError, match="retrieval' or 'answers"):
        render_job(cluster_settings, "eval", ["--data", "x"], _opts())
    with pytest.raises(ConfigError, match="Kubernetes names"):
        render_job(cluster_settings, "ingest", ["d"], _opts(name="Bad_Name"))
    with pytest.raises(ConfigError, match="NAME=SECRET:KEY"):
        parse_secret_env(["X=nokey"], "s")


def test_packing_is_first_fit_decreasing() -> None:
    pod = PodShape(4, "1Gi")
    assert pack([(3.0, 0.0)] * 4, pod) == 4  # fragmentation: one 3-CPU bundle per pod
    assert pack([(0.5, 0.0), (1.0, 0.0), (1.0, 0.0)], pod) == 1
    groups = plan_groups([Demand("d", 1.0, 0.0, 8, 2)], Shapes(cpu_worker=pod), "service")
    assert (groups[0].min_replicas, groups[0].max_replicas) == (1, 2)


# -- CLI ---------------------------------------------------------------------------------


def test_render_cli_writes_yaml_and_refuses_ambiguity(tmp_path: Path) -> None:
    runner = CliRunner()
    app = cluster_cli()
    out = tmp_path / "k" / "job.yaml"
    r = runner.invoke(
        app,
        ["kuberay", "render", "--job", "ingest", "--config", str(CLUSTER_YAML), "--set", "ingest.embed_actors=8",
         "--image", "registry.example/ragops:1", "--namespace", "ml", "--output", str(out), "--", "s3://b/docs"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    doc = yaml.safe_load(out.read_text())
    assert doc["metadata"]["namespace"] == "ml"
    assert _containers(doc)[0]["image"] == "registry.example/ragops:1"
    assert "no --data-pvc" in r.stderr
    r = runner.invoke(app, ["kuberay", "render", "--service", "--cluster"])
    assert r.exit_code == 2 and "exactly one" in r.stderr
    r = runner.invoke(app, ["kuberay", "render", "--job", "ingest", "--", "docs"])  # default config: embedded store
    assert r.exit_code == 2 and "Qdrant server" in r.stderr


def test_vllm_engine_renders_a_gpu_worker_group_for_the_generator() -> None:
    cpu = load_settings([CLUSTER_YAML], ["generator.engine=llamacpp", "serve.generator.num_gpus=0"], environ={})
    assert cpu.serve.generator.num_gpus == 0  # only vLLM ties the replica's GPUs to the engine
    settings = load_settings(
        [CLUSTER_YAML], ["generator.engine=vllm", "generator.vllm.tensor_parallel_size=2", "serve.generator.num_gpus=0"], environ={}
    )
    assert settings.serve.generator.num_gpus == 2.0  # follows the tensor-parallel size when unset
    with pytest.raises(ConfigError, match="does not fit a gpu worker pod"):
        render_service(settings, _opts())  # the default GPU pod has 1 GPU: a TP-2 replica cannot fit
    svc = render_service(settings, _opts(shapes=Shapes(gpu_worker=PodShape(16, "64Gi", 2))))
    gen = next(d for d in serve_config_v2(settings)["applications"][0]["deployments"] if d["name"] == "Generator")
    assert gen["ray_actor_options"]["num_gpus"] == 2.0
    gpu = _group(svc, "gpu-workers")
    assert gpu is not None
    assert int(gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) >= 2
    with pytest.raises(ConfigError, match="one GPU per tensor-parallel shard"):
        load_settings([CLUSTER_YAML], ["generator.engine=vllm", "generator.vllm.tensor_parallel_size=2", "serve.generator.num_gpus=1"],
                      environ={})  # fmt: skip
