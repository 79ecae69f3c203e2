"""Kubernetes: the README's `K8sRunLauncher` instance, validated and rendered offline with dagster-k8s's own code.

No cluster runs here. The `dagster.yaml` block of README.md ("On Kubernetes") goes through Dagster's instance
validation and the launcher's config schema; the run Job is built the way `K8sRunLauncher` builds it
(`K8sContainerContext.create_for_run` -> `get_k8s_job_config` -> `construct_dagster_k8s_job`), and once through
`K8sRunLauncher.launch_run` itself, with the Kubernetes API's `create_namespaced_job` recorded instead of sent.
Not checked: that a cluster schedules the pod on a GPU node, the NVIDIA device plugin, image pulls, RBAC.
"""

from __future__ import annotations

import copy
import json
import re
import sys
from pathlib import Path

import kubernetes
import pytest
import yaml
from dagster import DagsterRun, instance_for_test
from dagster._core.errors import DagsterInvalidConfigError
from dagster_k8s import K8sRunLauncher
from dagster_k8s.container_context import K8sContainerContext
from dagster_k8s.job import construct_dagster_k8s_job, get_job_name_from_run_id

# Private Dagster APIs, all here: Dagster has no public call that validates a dagster.yaml without building the
# instance (which would connect to Postgres and to a Kubernetes API server), nor a public run origin or launch
# context. These are the functions the instance and the launcher use themselves.
from dagster._config import process_config
from dagster._core.code_pointer import CodePointer
from dagster._core.instance.config import dagster_instance_config
from dagster._core.instance.ref import InstanceRef
from dagster._core.launcher import LaunchRunContext
from dagster._core.origin import JobPythonOrigin, RepositoryPythonOrigin
from dagster._serdes import ConfigurableClassData, serialize_value

from hy3d_pipeline.images.planner import run_request_for

README = Path(__file__).resolve().parents[1] / "README.md"
JOB_NAME = "__ASSET_JOB"  # the implicit asset job: what the sensor's and backfills' asset runs execute
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
GPU_NODES = {"nvidia.com/gpu.present": "true"}


def readme_block(name: str) -> str:
    """The fenced code block between `<!-- NAME:begin -->` and `<!-- NAME:end -->` in README.md."""
    text = README.read_text()
    found = re.search(rf"<!-- {name}:begin -->\s*```\w*\n(.*?)```\s*<!-- {name}:end -->", text, re.S)
    assert found, f"README.md has no {name} block"
    return found.group(1)


@pytest.fixture
def pg_env(monkeypatch):
    monkeypatch.setenv("DAGSTER_PG_URL", "postgresql+psycopg2://hy3d:s3cret@db:5432/dagster")


def instance_config(tmp_path, text: str) -> dict:
    """The instance config as Dagster validates `$DAGSTER_HOME/dagster.yaml` (raises DagsterInvalidConfigError)."""
    home = tmp_path / "dagster_home"
    home.mkdir(exist_ok=True)
    (home / "dagster.yaml").write_text(text)
    config, _cls = dagster_instance_config(str(home))
    return config


def launcher_config(config: dict) -> dict:
    """The run launcher's config after the launcher's own schema (defaults filled in), as the instance loads it."""
    section = config["run_launcher"]
    assert (section["module"], section["class"]) in {("dagster_k8s", "K8sRunLauncher"),
                                                      ("dagster_k8s.launcher", "K8sRunLauncher")}
    result = process_config(K8sRunLauncher.config_type(), section.get("config") or {})
    if not result.success:
        raise DagsterInvalidConfigError("K8sRunLauncher config", result.errors, section.get("config"))
    return dict(result.value)


class RecordedBatchApi:
    """Stands in for the cluster's batch/v1 API: keeps the Job that `launch_run` would create."""

    def __init__(self):
        self.created: list[tuple[str, kubernetes.client.V1Job]] = []

    def create_namespaced_job(self, body, namespace, **_kwargs):
        self.created.append((namespace, body))


def make_launcher(tmp_path, values: dict, batch_api=None) -> K8sRunLauncher:
    """The launcher from validated config; only how it reaches an API server differs (a kubeconfig naming an
    unreachable address instead of the in-cluster service account): nothing is ever sent."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "offline",
        "clusters": [{"name": "offline", "cluster": {"server": "https://127.0.0.1:9"}}],
        "contexts": [{"name": "offline", "context": {"cluster": "offline", "user": "offline"}}],
        "users": [{"name": "offline", "user": {"token": "unused"}}]}))
    values = {**values, "load_incluster_config": False, "kubeconfig_file": str(kubeconfig)}
    inst_data = ConfigurableClassData("dagster_k8s", "K8sRunLauncher", yaml.safe_dump(values))
    return K8sRunLauncher.from_config_value(inst_data, {**values, "k8s_client_batch_api": batch_api})


def run_with(tags: dict, container_context: dict | None = None, run_id: str = "0123abcd") -> DagsterRun:
    origin = JobPythonOrigin(JOB_NAME, RepositoryPythonOrigin(
        executable_path=sys.executable, code_pointer=CodePointer.from_module("hy3d_pipeline", "defs", None),
        container_context=container_context))
    return DagsterRun(job_name=JOB_NAME, run_id=run_id, tags=tags, job_code_origin=origin)


def render(launcher: K8sRunLauncher, run: DagsterRun) -> kubernetes.client.V1Job:
    """The run worker's Job, built as `K8sRunLauncher._launch_k8s_job_with_args` builds it."""
    context = launcher.get_container_context_for_run(run)  # = K8sContainerContext.create_for_run(run, launcher, True)
    repository_origin = run.job_code_origin.repository_origin
    job_name = get_job_name_from_run_id(run.run_id)
    return construct_dagster_k8s_job(
        job_config=context.get_k8s_job_config(job_image=repository_origin.container_image, run_launcher=launcher),
        args=["dagster", "api", "execute_run", "..."],
        job_name=job_name, pod_name=job_name, component="run_worker",
        user_defined_k8s_config=context.run_k8s_config,
        labels={"dagster/job": JOB_NAME, "dagster/run-id": run.run_id},
        env_vars=[{"name": "DAGSTER_RUN_JOB_NAME", "value": JOB_NAME}])


def as_sent(job: kubernetes.client.V1Job) -> dict:
    """The JSON body the Kubernetes client would send (camelCase, quantities as strings)."""
    return kubernetes.client.ApiClient().sanitize_for_serialization(job)


@pytest.fixture
def readme_launcher_values(tmp_path, pg_env) -> dict:
    return launcher_config(instance_config(tmp_path, readme_block("k8s-dagster-yaml")))


def test_readme_dagster_yaml_is_a_valid_k8s_instance(tmp_path, pg_env):
    config = instance_config(tmp_path, readme_block("k8s-dagster-yaml"))
    values = launcher_config(config)
    for required in ("instance_config_map", "dagster_home", "job_image", "service_account_name"):
        assert values.get(required), required
    assert values["env_secrets"] and values["env_config_maps"]
    assert "postgres" in config["storage"] and config["run_monitoring"]["enabled"] is True


def test_the_validation_refuses_what_the_launcher_refuses(tmp_path, pg_env):
    """The README's former block (a class and no config) fails exactly as the daemon reported; so does the
    complete block with any required entry taken out."""
    bare = "run_launcher:\n  module: dagster_k8s\n  class: K8sRunLauncher\n"
    with pytest.raises(DagsterInvalidConfigError, match='Missing required config entry "instance_config_map"'):
        launcher_config(instance_config(tmp_path, bare))
    full = yaml.safe_load(readme_block("k8s-dagster-yaml"))
    del full["run_launcher"]["config"]["instance_config_map"]
    with pytest.raises(DagsterInvalidConfigError, match="instance_config_map"):
        launcher_config(instance_config(tmp_path, yaml.safe_dump(full)))
    full = yaml.safe_load(readme_block("k8s-dagster-yaml"))
    full["run_launcher"]["config"]["run_k8s_config"]["pod_spec"] = {}  # a misspelt key is refused, not ignored
    with pytest.raises(DagsterInvalidConfigError):
        launcher_config(instance_config(tmp_path, yaml.safe_dump(full)))


def _sensor_batch_tags() -> dict:
    return dict(run_request_for(["a.png", "b.png", "c.png"], {"a.png": "1", "b.png": "2", "c.png": "3"}).tags)


RUN_ORIGINS = {
    "ui-launch": {},
    "sensor-batch": {**_sensor_batch_tags(), "dagster/sensor_name": "new_images_sensor", "dagster/run_key": "x"},
    "sensor-single": {**run_request_for(["a.png"], {"a.png": "1"}).tags, "dagster/partition": "a.png",
                      "dagster/sensor_name": "new_images_sensor"},
    "asset-backfill": {"dagster/backfill": "abcdefgh", "dagster/asset_partition_range_start": "a.png",
                       "dagster/asset_partition_range_end": "c.png"},
}


@pytest.mark.parametrize("origin", sorted(RUN_ORIGINS))
def test_every_run_pod_gets_the_gpu(tmp_path, readme_launcher_values, origin):
    assert "dagster-k8s/config" not in RUN_ORIGINS[origin]  # the GPU does not depend on how the run started
    job = render(make_launcher(tmp_path, readme_launcher_values), run_with(RUN_ORIGINS[origin]))
    pod = job.spec.template.spec
    (container,) = pod.containers
    assert container.resources.limits["nvidia.com/gpu"] == "1"
    assert [t.to_dict() for t in pod.tolerations] == [{**GPU_TOLERATION, "toleration_seconds": None, "value": None}]
    assert pod.node_selector == GPU_NODES
    assert pod.service_account_name == "hy3d-runs" and pod.restart_policy == "Never"
    assert container.image == "registry.example.com/hy3d-pipeline:1.0"
    assert {"name": "DAGSTER_HOME", "value": "/opt/dagster/dagster_home"} in [
        {"name": e.name, "value": e.value} for e in container.env]
    sent = as_sent(job)["spec"]["template"]["spec"]
    assert sent["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": "1"}
    assert sent["nodeSelector"] == GPU_NODES and sent["tolerations"] == [GPU_TOLERATION]
    assert sent["containers"][0]["envFrom"] == [{"configMapRef": {"name": "hy3d-env"}},
                                                {"secretRef": {"name": "hy3d-secrets"}}]
    assert sent["containers"][0]["volumeMounts"] == [{"name": "hy3d-weights", "mountPath": "/models",
                                                      "readOnly": True}]
    assert sent["volumes"] == [{"name": "hy3d-weights",
                                "persistentVolumeClaim": {"claimName": "hy3d-weights", "readOnly": True}}]


def test_launch_run_creates_that_job(tmp_path, readme_launcher_values):
    """`K8sRunLauncher.launch_run` itself, with the cluster's API recorded: the Job it would create is the one
    rendered above, in `job_namespace`."""
    batch = RecordedBatchApi()
    launcher = make_launcher(tmp_path, readme_launcher_values, batch)
    run = run_with(RUN_ORIGINS["asset-backfill"], run_id="feedbeef")
    with instance_for_test() as instance:
        launcher.register_instance(instance)
        instance.add_run(run)
        launcher.launch_run(LaunchRunContext(dagster_run=run, workspace=None))
        assert instance.get_run_by_id(run.run_id).tags["dagster/image"] == "registry.example.com/hy3d-pipeline:1.0"
    ((namespace, job),) = batch.created
    assert namespace == "hy3d"
    created, expected = as_sent(job), as_sent(render(launcher, run))
    args = created["spec"]["template"]["spec"]["containers"][0].pop("args")  # the run origin's python
    assert args[:5] == [sys.executable, "-m", "dagster", "api", "execute_run"]
    expected["spec"]["template"]["spec"]["containers"][0].pop("args")
    assert created == expected


def test_a_run_tag_merges_onto_the_launcher_config(tmp_path, readme_launcher_values):
    """A `dagster-k8s/config` tag (launchpad, or a backfill's tags) deep-merges: two GPUs, same nodes."""
    tag = {"container_config": {"resources": {"limits": {"nvidia.com/gpu": 2}, "requests": {"cpu": "8"}}}}
    job = render(make_launcher(tmp_path, readme_launcher_values),
                 run_with({**RUN_ORIGINS["asset-backfill"], "dagster-k8s/config": json.dumps(tag)}))
    sent = as_sent(job)["spec"]["template"]["spec"]
    assert sent["containers"][0]["resources"] == {"limits": {"nvidia.com/gpu": "2"}, "requests": {"cpu": "8"}}
    assert sent["nodeSelector"] == GPU_NODES and sent["tolerations"] == [GPU_TOLERATION]


def test_readme_container_context_gives_the_gpu_per_code_location(tmp_path, readme_launcher_values):
    """The README's per-code-location alternative: the same keys as the code server's container context, on a
    launcher without `run_k8s_config`."""
    context = json.loads(readme_block("k8s-container-context"))
    K8sContainerContext.create_from_config(context)  # dagster-k8s's own validation of a container context
    values = copy.deepcopy(readme_launcher_values)
    del values["run_k8s_config"]
    launcher = make_launcher(tmp_path, values)
    assert "nvidia.com/gpu" not in str(as_sent(render(launcher, run_with({})))), "the launcher alone asks for none"
    for tags in RUN_ORIGINS.values():
        sent = as_sent(render(launcher, run_with(tags, container_context=context)))["spec"]["template"]["spec"]
        assert sent["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": "1"}
        assert sent["nodeSelector"] == GPU_NODES and sent["tolerations"] == [GPU_TOLERATION]


def test_run_pod_resolves_the_storage_url_itself(tmp_path, pg_env):
    """The instance reaches the run pod in its launch arguments with `{env: DAGSTER_PG_URL}` unresolved (what the
    README says): the password is not in the Job, and the pod needs the variable from the secret."""
    instance_config(tmp_path, readme_block("k8s-dagster-yaml"))
    ref = serialize_value(InstanceRef.from_dir(str(tmp_path / "dagster_home")))
    assert "DAGSTER_PG_URL" in ref and "s3cret" not in ref
