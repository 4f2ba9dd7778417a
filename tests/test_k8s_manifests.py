"""deploy/k8s validated offline (no cluster here; docs/scale-out.md says what never ran on one).

- every overlay renders with ``kubectl kustomize`` (and with the model-from-image component);
- every built-in kind validates with ``kubernetes-validate --strict`` against a pinned Kubernetes;
- the KServe kinds validate against the ``openAPIV3Schema`` of KServe's CRDs (tests/data/kserve/),
  closed so that an unknown field fails; bad manifests show that each validator rejects a wrong
  type and an unknown field;
- the rendered gateway Deployment's args and ports agree with ``server.cli``'s parser defaults,
  with the Services it names and with the Prometheus / prometheus-adapter rules, whose metric
  names exist in server/metrics.py or are Triton's (those the dashboard reads from a live Triton
  in tests/loadtest/test_prometheus.py), and whose queries (run by ``promtool test rules`` on
  synthetic series) compute what docs/scale-out.md says.
- every flag given to tritonserver is one its ``--help`` lists (the nvidia-pytriton binary).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from server import metrics
from server.catalog import PRECISION_ORDER
from server.front.pools import plan_pools
from server.launcher.distribution import find_distribution
from server.launcher.errors import TritonNotInstalled
from server.routing.policies import RoutingConfig, parse_routing
from server.runtime.options import parse
from server.transports.options import Ports
from tests.helpers import skip_or_fail

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu", "kserve")
KSERVE_DATA = Path(__file__).parent / "data" / "kserve"
KSERVE_SCHEMAS = {
    ("serving.kserve.io/v1alpha1", "ClusterServingRuntime"): "clusterservingruntimes.v1alpha1.json",
    ("serving.kserve.io/v1beta1", "InferenceService"): "inferenceservices.v1beta1.json",
}
# Gateway API's HTTPRoute CRD (v1.6.1, standard channel), for the example in deploy/k8s/gateway-api
GATEWAY_API_SCHEMAS = {
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): Path(__file__).parent
    / "data"
    / "gateway-api"
    / "httproutes.v1.json",
}
GATEWAY_API_EXAMPLE = ROOT / "deploy" / "k8s" / "gateway-api" / "digits-httproute.yaml"
# The Kubernetes release the built-in kinds are validated against (kubectl here is 1.32 too).
K8S_VERSION = "1.32.0"
ADAPTER_VALUES = K8S / "monitoring" / "prometheus-adapter-values.yaml"
SCRAPE_CONFIG = K8S / "monitoring" / "prometheus-scrape.yml"

Doc = dict[str, Any]


# ---- rendering ---------------------------------------------------------------------------------


def _kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        skip_or_fail("kubectl is not installed (needed for `kubectl kustomize`)")
    return str(path)


def kustomize(directory: Path) -> list[Doc]:
    out = subprocess.run(
        [_kubectl(), "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, f"kubectl kustomize {directory} failed:\n{out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Doc]]:
    return {name: kustomize(K8S / "overlays" / name) for name in OVERLAYS}


def find(docs: list[Doc], kind: str, name: str) -> Doc:
    hits = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(hits) == 1, f"expected one {kind}/{name}, found {len(hits)}"
    return hits[0]


def containers(doc: Doc) -> list[Doc]:
    spec = doc["spec"]["template"]["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def kinds(docs: list[Doc]) -> set[tuple[str, str]]:
    return {(d["kind"], d["metadata"]["name"]) for d in docs}


def _image_strings(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in ([v] if k == "image" else _image_strings(v))]
    if isinstance(node, list):
        return [s for v in node for s in _image_strings(v)]
    return []


def test_triton_images_survive_cancels(rendered: dict[str, list[Doc]]) -> None:
    """Every tritonserver image is NGC 24.12 (Triton 2.53) or later: older ones can crash on
    the cancelled calls the Envoy front passes on, and the gateway's front=auto would then keep
    the Python front (docs/envoy.md)."""
    for overlay, docs in rendered.items():
        images = [i for d in docs for i in _image_strings(d) if "tritonserver" in str(i)]
        assert images, overlay
        for image in images:
            year, month = (int(x) for x in str(image).rpartition(":")[2].split("-")[0].split("."))
            assert (year, month) >= (24, 12), (overlay, image)


def test_every_overlay_renders_the_pieces_it_promises(rendered: dict[str, list[Doc]]) -> None:
    gateway = {
        ("Deployment", "gateway"),
        ("Service", "gateway"),
        ("PodDisruptionBudget", "gateway"),
        ("HorizontalPodAutoscaler", "gateway"),
        ("PersistentVolumeClaim", "model-repository"),
    }
    pool = {
        ("Deployment", "triton-{p}"),
        ("Service", "triton-{p}"),
        ("PodDisruptionBudget", "triton-{p}"),
        ("HorizontalPodAutoscaler", "triton-{p}"),
    }

    def pools(*names: str) -> set[tuple[str, str]]:
        return {(k, n.format(p=p)) for p in names for k, n in pool}

    def rendered_kinds(overlay: str) -> set[tuple[str, str]]:
        """(the routing file's ConfigMap: gateway_routing below)"""
        return {k for k in kinds(rendered[overlay]) if k[0] != "ConfigMap"}

    assert kinds(rendered["cpu"]) == gateway | pools("cpu")
    assert rendered_kinds("gpu") == gateway | pools("cpu", "gpu")
    assert rendered_kinds("kserve") == gateway | {
        ("ClusterServingRuntime", "precision-serve-triton"),
        ("InferenceService", "triton-cpu"),
        ("InferenceService", "triton-gpu"),
    }


def test_model_from_image_component_replaces_the_pvc(tmp_path: Path) -> None:
    rel = os.path.relpath(K8S, tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        f"resources: [{rel}/overlays/gpu]\ncomponents: [{rel}/components/model-from-image]\n"
    )
    docs = kustomize(tmp_path)
    assert not [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    assert {d["metadata"]["name"] for d in deployments} == {"gateway", "triton-cpu", "triton-gpu"}
    for d in deployments:
        spec = d["spec"]["template"]["spec"]
        (volume,) = [v for v in spec["volumes"] if v["name"] == "model-repository"]
        assert set(volume) == {"name", "emptyDir"}, volume
        (init,) = spec["initContainers"]
        assert init["image"] == "precision-serve:baked"
        assert {m["name"] for m in init["volumeMounts"]} == {"model-repository"}
    validate_builtin(docs)


# ---- built-in kinds: kubernetes-validate --strict ----------------------------------------------


def _kubernetes_validate() -> Any:
    try:
        import kubernetes_validate
    except ImportError:
        skip_or_fail("kubernetes-validate is not installed (pip install kubernetes-validate)")
    return kubernetes_validate


def is_kserve(doc: Doc) -> bool:
    return str(doc["apiVersion"]).startswith("serving.kserve.io/")


def validate_builtin(docs: list[Doc]) -> int:
    kv = _kubernetes_validate()
    n = 0
    for doc in docs:
        if not is_kserve(doc):
            kv.validate(doc, K8S_VERSION, strict=True)
            n += 1
    return n


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_builtin_kinds_validate_strictly(rendered: dict[str, list[Doc]], overlay: str) -> None:
    assert validate_builtin(rendered[overlay]) >= 5


def test_strict_validation_rejects_a_wrong_type_and_an_unknown_field(
    rendered: dict[str, list[Doc]],
) -> None:
    kv = _kubernetes_validate()
    good = find(rendered["cpu"], "Deployment", "gateway")
    kv.validate(good, K8S_VERSION, strict=True)

    wrong_type = copy.deepcopy(good)
    wrong_type["spec"]["replicas"] = "two"
    with pytest.raises(kv.ValidationError, match="not of type"):
        kv.validate(wrong_type, K8S_VERSION, strict=True)

    unknown = copy.deepcopy(good)
    unknown["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    with pytest.raises(kv.ValidationError, match="imagePullPolcy"):
        kv.validate(unknown, K8S_VERSION, strict=True)


# ---- KServe kinds: the CRDs' openAPIV3Schema, closed -------------------------------------------


def close_schema(schema: Any) -> Any:
    """``additionalProperties: false`` on every object schema that lists ``properties`` and leaves
    extra fields open (unless it preserves unknown fields, as the API server would)."""
    if isinstance(schema, list):
        return [close_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: close_schema(v) for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def _schema(doc: Doc, closed: bool = True) -> dict[str, Any]:
    key = (doc["apiVersion"], doc["kind"])
    if key in GATEWAY_API_SCHEMAS:
        schema = json.loads(GATEWAY_API_SCHEMAS[key].read_text())
        return close_schema(schema) if closed else schema
    assert key in KSERVE_SCHEMAS, f"no CRD schema in tests/data/kserve for {key}"
    schema = json.loads((KSERVE_DATA / KSERVE_SCHEMAS[key]).read_text())
    return close_schema(schema) if closed else schema


def kserve_errors(doc: Doc, closed: bool = True) -> list[str]:
    import jsonschema

    validator = jsonschema.Draft7Validator(_schema(doc, closed))
    errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(doc)]
    # A CRD says only `metadata: {type: object}`: check it as Kubernetes' ObjectMeta.
    kv = _kubernetes_validate()
    try:
        kv.validate(
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]},
            K8S_VERSION,
            strict=True,
        )
    except kv.ValidationError as e:
        errors.append(f"metadata: {e.message}")
    return errors


def test_kserve_kinds_validate_against_the_crd_schemas(rendered: dict[str, list[Doc]]) -> None:
    docs = [d for d in rendered["kserve"] if is_kserve(d)]
    assert {d["kind"] for d in docs} == {"ClusterServingRuntime", "InferenceService"}
    for doc in docs:
        assert kserve_errors(doc) == [], doc["metadata"]["name"]


def test_the_closed_crd_schema_rejects_what_the_open_one_lets_through(
    rendered: dict[str, list[Doc]],
) -> None:
    isvc = find(rendered["kserve"], "InferenceService", "triton-cpu")

    misspelled = copy.deepcopy(isvc)
    misspelled["spec"]["predictor"]["model"]["storageUrl"] = "pvc://model-repository/"
    assert kserve_errors(misspelled, closed=False) == []  # the CRD as published: open
    (error,) = kserve_errors(misspelled)
    assert "storageUrl" in error

    wrong_type = copy.deepcopy(isvc)
    wrong_type["spec"]["predictor"]["minReplicas"] = "2"
    (error,) = kserve_errors(wrong_type)
    assert error.startswith("spec/predictor/minReplicas") and "not of type" in error

    runtime = find(rendered["kserve"], "ClusterServingRuntime", "precision-serve-triton")
    bad_port = copy.deepcopy(runtime)
    bad_port["spec"]["containers"][0]["ports"][0]["containerPort"] = "8001"
    assert any("containerPort" in e for e in kserve_errors(bad_port))

    bad_meta = copy.deepcopy(runtime)
    bad_meta["metadata"]["lables"] = {"a": "b"}
    assert any("lables" in e for e in kserve_errors(bad_meta))


# ---- the gateway's args and ports vs server/cli.py ---------------------------------------------


def gateway_args(docs: list[Doc]) -> Any:
    (container,) = find(docs, "Deployment", "gateway")["spec"]["template"]["spec"]["containers"]
    return parse(container["args"])


def gateway_routing(docs: list[Doc]) -> RoutingConfig | None:
    """The routing file the gateway's ``--routing`` names, read (and parsed as the gateway
    parses it) from the ConfigMap mounted at its folder; None without ``--routing``."""
    path = gateway_args(docs).routing.routing
    if path is None:
        return None
    pod = find(docs, "Deployment", "gateway")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == str(path.parent)]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    config_map = find(docs, "ConfigMap", volume["configMap"]["name"])
    return parse_routing(yaml.safe_load(config_map["data"][path.name]), str(path))


def upstream_specs(docs: list[Doc]) -> list[str]:
    """The gateway's --upstream and its routing file's pools."""
    routing = gateway_routing(docs)
    pools = list(routing.pools.values()) if routing is not None else []
    return [gateway_args(docs).upstream.spec, *pools]


def port_map(container: Doc) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container["ports"]}


def upstream_addresses(upstream: str) -> Iterator[tuple[str, int]]:
    scheme, _, rest = upstream.partition("://")
    assert scheme in ("triton", "triton+dns"), upstream
    for entry in rest.partition("?")[0].split(","):
        host, _, port = entry.rpartition(":")
        yield host, int(port)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_args_and_ports_agree_with_the_cli(
    rendered: dict[str, list[Doc]], overlay: str
) -> None:
    docs = rendered[overlay]
    defaults = parse(["--repository", "/x"])
    args = gateway_args(docs)
    deployment = find(docs, "Deployment", "gateway")
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]

    # The CLI's default ports, exposed under the names the Service and probes use.
    assert args.listen.ports == Ports(http=8000, grpc=8001, metrics=8002)
    assert args.listen.ports == defaults.listen.ports
    ports = port_map(container)
    assert ports == {
        "http": args.listen.http_port,
        "grpc": args.listen.grpc_port,
        "metrics": args.listen.metrics_port,
    }
    assert (
        args.listen.host == "0.0.0.0"
    )  # the default (loopback) would be unreachable from the Service
    service = find(docs, "Service", "gateway")
    assert {p["name"]: p["targetPort"] for p in service["spec"]["ports"]} == {
        name: name for name in ports
    }
    selector = service["spec"]["selector"]
    assert selector.items() <= pod["metadata"]["labels"].items()

    for probe, path in (
        ("startupProbe", "/v2/health/live"),
        ("livenessProbe", "/v2/health/live"),
        ("readinessProbe", "/v2/health/ready"),
    ):
        assert container[probe]["httpGet"] == {"path": path, "port": "http"}, probe

    # The repository is the mounted volume; draining fits in the pod's grace period.
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert str(args.routing.repository) == mounts["model-repository"]
    assert (
        args.process.shutdown.drain_s + args.process.shutdown.grace_s
        < pod["spec"]["terminationGracePeriodSeconds"]
    )

    # Prometheus scrapes the metrics port the gateway really binds.
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == args.listen.metrics_port
    assert annotations["prometheus.io/path"] == "/metrics"


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_gateway_upstream_names_headless_pool_services(
    rendered: dict[str, list[Doc]], overlay: str
) -> None:
    docs = rendered[overlay]
    addresses = [a for spec in upstream_specs(docs) for a in upstream_addresses(spec)]
    pools = sorted(d["metadata"]["name"] for d in docs if d["kind"] == "Deployment")
    assert sorted(host for host, _ in addresses) == [p for p in pools if p != "gateway"]
    for host, port in addresses:
        service = find(docs, "Service", host)
        assert service["spec"]["clusterIP"] == "None", f"{host} must be headless"
        (grpc,) = [p for p in service["spec"]["ports"] if p["name"] == "grpc"]
        assert grpc["port"] == port
        deployment = find(docs, "Deployment", host)
        pod = deployment["spec"]["template"]
        assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
        (triton,) = pod["spec"]["containers"]
        assert f"--grpc-port={port_map(triton)['grpc']}" in triton["args"]
        assert port_map(triton)["grpc"] == port


def test_the_cpu_gateway_runs_envoy_in_front_of_the_triton_pods(
    rendered: dict[str, list[Doc]],
) -> None:
    """cpu: the Envoy front (the default) with DNS-discovered replicas and HTTP inference sent to
    the Triton pods' HTTP port (gpu and kserve: the test below)."""
    docs = rendered["cpu"]
    upstream = gateway_args(docs).upstream
    assert upstream.settings.front == "auto"  # Envoy: 24.12 images (test_triton_images_...)
    assert upstream.spec.startswith("triton+dns://")  # Envoy STRICT_DNS clusters
    ((host, _),) = upstream_addresses(upstream.spec)
    (triton,) = find(docs, "Deployment", host)["spec"]["template"]["spec"]["containers"]
    assert upstream.settings.http_port == port_map(triton)["http"]
    assert f"--http-port={port_map(triton)['http']}" in triton["args"]
    (gateway,) = find(docs, "Deployment", "gateway")["spec"]["template"]["spec"]["containers"]
    assert any(m["mountPath"] == "/tmp" for m in gateway["volumeMounts"])  # Envoy's config folder


def loaded_models(docs: list[Doc], host: str) -> tuple[set[str], int]:
    """The models the pods behind Service ``host`` load (--load-model) and their HTTP port: a
    Triton Deployment's, or a KServe predictor's (``<isvc>-predictor``: the runtime's ports)."""
    isvc = host.removesuffix("-predictor")
    if host != isvc:
        model = find(docs, "InferenceService", isvc)["spec"]["predictor"]["model"]
        runtime = find(docs, "ClusterServingRuntime", model["runtime"])
        (container,) = runtime["spec"]["containers"]
        args = model["args"]
    else:
        (container,) = find(docs, "Deployment", host)["spec"]["template"]["spec"]["containers"]
        args = container["args"]
    loaded = {a.split("=", 1)[1] for a in args if a.startswith("--load-model=")}
    return loaded, port_map(container)["http"]


@pytest.mark.parametrize("overlay", ["gpu", "kserve"])
def test_pools_run_the_envoy_front_with_each_variant_on_the_pods_that_load_it(
    rendered: dict[str, list[Doc]], overlay: str
) -> None:
    """gpu and kserve: two pools that load different variants. The routing file's precision
    pools put each variant on the pods that load it, so the Envoy front (server/front/pools.py,
    as the gateway plans it) runs with every variant's clusters on its own pool's pods, found
    by DNS, HTTP inference on their HTTP port; nothing is left to the control plane."""
    docs = rendered[overlay]
    routing = gateway_routing(docs)
    assert routing is not None and routing.pools, overlay
    hosts = {host for spec in upstream_specs(docs) for host, _ in upstream_addresses(spec)}
    loaded = {host: loaded_models(docs, host) for host in hosts}
    variants = {
        name
        for models, _ in loaded.values()
        for name in models
        if name.removeprefix("digits_") in PRECISION_ORDER
    }
    assert {"digits_fp16", "digits_int8", "digits_fp32"} <= variants
    pools = routing.for_model("digits").precision_pools
    assignment = {f"digits_{p}": pool for p, pool in pools.items()}
    plan = plan_pools(gateway_args(docs).upstream.spec, routing.pools, assignment, variants)
    # front=auto: Envoy, as the Tritons are cancel-safe (test_triton_images_survive_cancels)
    assert plan.front == "auto" and plan.elsewhere == frozenset()
    assert set(plan.replicas) == variants
    for variant, replicas in plan.replicas.items():
        (endpoint,) = replicas.endpoints
        assert replicas.dns, variant  # STRICT_DNS: every pod a replica
        models, http_port = loaded[endpoint.host]
        assert variant in models, (variant, endpoint.host)
        assert replicas.http_port == http_port


def test_kserve_gateway_upstream_names_the_predictors(rendered: dict[str, list[Doc]]) -> None:
    docs = rendered["kserve"]
    runtime = find(docs, "ClusterServingRuntime", "precision-serve-triton")
    (container,) = runtime["spec"]["containers"]
    grpc_port = port_map(container)["h2c"]
    assert f"--grpc-port={grpc_port}" in container["args"]
    isvcs = sorted(d["metadata"]["name"] for d in docs if d["kind"] == "InferenceService")
    addresses = [a for spec in upstream_specs(docs) for a in upstream_addresses(spec)]
    assert sorted(host for host, _ in addresses) == [f"{name}-predictor" for name in isvcs]
    assert {port for _, port in addresses} == {grpc_port}
    for name in isvcs:
        model = find(docs, "InferenceService", name)["spec"]["predictor"]["model"]
        assert model["runtime"] == runtime["metadata"]["name"]


def test_gateway_api_example_validates_and_maps_the_routes(rendered: dict[str, list[Doc]]) -> None:
    """deploy/k8s/gateway-api: the Services validate as Kubernetes 1.32 objects, the HTTPRoute
    against Gateway API's CRD schema (closed: an unknown field fails; its CEL rules are not run
    here); each backend is a Service over the CPU pool's pods whose URLRewrite names the variant
    of that Service's precision, and the split's weights add up to 100."""
    docs = [d for d in yaml.safe_load_all(GATEWAY_API_EXAMPLE.read_text()) if d]
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    (route,) = [d for d in docs if d["kind"] == "HTTPRoute"]
    assert validate_builtin(list(services.values())) == 2
    assert kserve_errors(route) == []
    wrong = copy.deepcopy(route)
    wrong["spec"]["rules"][0]["backendRefs"][0]["wieght"] = 1
    assert any("wieght" in e for e in kserve_errors(wrong))

    pool = find(rendered["cpu"], "Deployment", "triton-cpu")["spec"]["template"]
    (triton,) = pool["spec"]["containers"]
    for service in services.values():
        assert service["spec"]["selector"].items() <= pool["metadata"]["labels"].items()
        (port,) = service["spec"]["ports"]
        assert port["targetPort"] == "http" and port["port"] == port_map(triton)["http"]
    asked, split = route["spec"]["rules"][:-1], route["spec"]["rules"][-1]
    for rule in route["spec"]["rules"]:
        (match,) = rule["matches"]
        assert match["path"] == {"type": "PathPrefix", "value": "/v2/models/digits"}
        for ref in rule["backendRefs"]:
            precision = services[ref["name"]]["metadata"]["labels"]["precision-serve/precision"]
            (rewrite,) = ref["filters"]
            assert rewrite["urlRewrite"]["path"]["replacePrefixMatch"] == (
                f"/v2/models/digits_{precision}"
            )
    for rule in asked:
        (header,) = rule["matches"][0]["headers"]
        (ref,) = rule["backendRefs"]
        precision = services[ref["name"]]["metadata"]["labels"]["precision-serve/precision"]
        assert header == {"type": "Exact", "name": "x-precision", "value": precision}
    assert sum(ref["weight"] for ref in split["backendRefs"]) == 100


# ---- Triton pods -------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_triton_pools_probe_health_and_run_unprivileged(
    rendered: dict[str, list[Doc]], overlay: str
) -> None:
    docs = rendered[overlay]
    for deployment in (d for d in docs if d["metadata"]["name"].startswith("triton-")):
        if deployment["kind"] != "Deployment":
            continue
        pod = deployment["spec"]["template"]
        (c,) = pod["spec"]["containers"]
        ports = port_map(c)
        for flag in ("http", "grpc", "metrics"):
            assert f"--{flag}-port={ports[flag]}" in c["args"]
        assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
        assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
        assert c["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert int(pod["metadata"]["annotations"]["prometheus.io/port"]) == ports["metrics"]
        assert "--model-control-mode=explicit" in c["args"]
        assert [a for a in c["args"] if a.startswith("--load-model=")]
        gpus = c["resources"]["limits"].get("nvidia.com/gpu")
        assert gpus == (1 if deployment["metadata"]["name"] == "triton-gpu" else None)


def triton_args(docs: list[Doc]) -> list[str]:
    """Every argument the manifests pass to tritonserver (pool Deployments, KServe runtime and
    InferenceServices, whose args KServe appends to the runtime's)."""
    args: list[str] = []
    for d in docs:
        if d["kind"] == "Deployment" and d["metadata"]["name"].startswith("triton-"):
            args += [a for c in d["spec"]["template"]["spec"]["containers"] for a in c["args"]]
        elif d["kind"] == "ClusterServingRuntime":
            args += [a for c in d["spec"]["containers"] for a in c["args"]]
        elif d["kind"] == "InferenceService":
            args += d["spec"]["predictor"]["model"].get("args", [])
    return args


def test_triton_flags_exist_in_tritonserver(rendered: dict[str, list[Doc]]) -> None:
    """Each flag is one that `tritonserver --help` lists (the binary of the nvidia-pytriton wheel,
    Triton 2.51; the manifests run NGC 24.12, Triton 2.53)."""
    try:
        dist = find_distribution()
    except TritonNotInstalled as e:
        skip_or_fail(f"no tritonserver binary: {e}")
    env = {**os.environ, "LD_LIBRARY_PATH": str(dist.libs_dir)}
    out = subprocess.run(
        [str(dist.binary), "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    known = set(re.findall(r"^\s+(--[a-z0-9-]+)", out.stdout + out.stderr, re.MULTILINE))
    assert {"--model-repository", "--load-model", "--grpc-port"} <= known, out.stderr[-2000:]
    used = {a.split("=", 1)[0] for o in rendered.values() for a in triton_args(o)}
    assert {"--load-model", "--model-control-mode", "--exit-timeout-secs"} <= used
    assert used - known == set()


# ---- Prometheus and prometheus-adapter ---------------------------------------------------------


def adapter_rules() -> dict[str, Doc]:
    values = yaml.safe_load(ADAPTER_VALUES.read_text())
    return {r["name"]["as"]: r for r in values["rules"]["custom"]}


def series_name(rule: Doc) -> str:
    match = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)\{", rule["seriesQuery"])
    assert match, rule["seriesQuery"]
    return match.group(1)


DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "precision-serve.json"


def dashboard_triton_series() -> set[str]:
    """Triton series the Grafana dashboard queries: tests/loadtest/test_prometheus.py checks that
    each of those queries returns data from a live Triton, so these names are Triton's."""
    return set(re.findall(r"\b(nv_[a-z_]+)\[", DASHBOARD.read_text()))


def test_every_hpa_metric_has_an_adapter_rule_on_real_series(
    rendered: dict[str, list[Doc]],
) -> None:
    rules = adapter_rules()
    hpa_metrics = {
        (d["spec"]["scaleTargetRef"]["name"], m["pods"]["metric"]["name"])
        for overlay in rendered.values()
        for d in overlay
        if d["kind"] == "HorizontalPodAutoscaler"
        for m in d["spec"]["metrics"]
    }
    assert hpa_metrics == {
        ("gateway", "precision_serve_inflight_requests"),
        ("triton-cpu", "avg_time_queue_us"),
        ("triton-gpu", "avg_time_queue_us"),
    }
    assert {name for _, name in hpa_metrics} == set(rules)

    # The gateway's series: the in-flight gauge of server/metrics.py (a gauge, per model).
    gateway = rules["precision_serve_inflight_requests"]
    assert series_name(gateway) == metrics.INFLIGHT._name
    assert metrics.INFLIGHT._type == "gauge"
    assert "precision_serve_inflight_requests{<<.LabelMatchers>>}" in gateway["metricsQuery"]
    # ... and the Envoy front's attempts in flight (server/front/metrics.py exports them)
    envoy = "precision_serve_envoy_upstream_active_requests"
    assert f"{envoy}{{<<.LabelMatchers>>}}" in gateway["metricsQuery"]
    assert f'"{envoy}"' in (ROOT / "server" / "front" / "metrics.py").read_text()

    # Triton's series: names a live Triton exports (the dashboard's, checked against one).
    triton = rules["avg_time_queue_us"]
    names = {series_name(triton), *re.findall(r"\b(nv_[a-z_]+)\{", triton["metricsQuery"])}
    assert names == {"nv_inference_queue_duration_us", "nv_inference_request_success"}
    assert names <= dashboard_triton_series()

    # Both rules map the namespace/pod labels that the scrape config attaches, and pin no
    # namespace (server#6247: a seriesQuery for namespace="default" finds nothing elsewhere).
    for rule in rules.values():
        assert rule["resources"]["overrides"] == {
            "namespace": {"resource": "namespace"},
            "pod": {"resource": "pod"},
        }
        assert 'namespace!=""' in rule["seriesQuery"] and 'pod!=""' in rule["seriesQuery"]


def test_scrape_config_keeps_annotated_pods_and_labels_namespace_and_pod() -> None:
    config = yaml.safe_load(SCRAPE_CONFIG.read_text())
    (job,) = config["scrape_configs"]
    assert job["kubernetes_sd_configs"] == [{"role": "pod"}]
    relabel = job["relabel_configs"]
    targets = {r.get("target_label"): r["source_labels"] for r in relabel if "target_label" in r}
    assert targets["namespace"] == ["__meta_kubernetes_namespace"]
    assert targets["pod"] == ["__meta_kubernetes_pod_name"]
    assert targets["__metrics_path__"] == ["__meta_kubernetes_pod_annotation_prometheus_io_path"]
    (keep,) = [r for r in relabel if r.get("action") == "keep"]
    assert keep["source_labels"] == ["__meta_kubernetes_pod_annotation_prometheus_io_scrape"]
    # The address rewrite turns a pod address + the prometheus.io/port annotation into HOST:PORT.
    (address,) = [r for r in relabel if r.get("target_label") == "__address__"]
    regex = re.compile(address["regex"])
    for joined in ("10.1.2.3:8000;8002", "10.1.2.3;8002"):
        m = regex.fullmatch(joined)
        assert m, joined
        assert m.expand(address["replacement"].replace("$", "\\")) == "10.1.2.3:8002"


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        skip_or_fail("promtool is not installed (Debian package prometheus)")
    return str(path)


def adapter_query(rule: Doc, pods: str) -> str:
    """The PromQL prometheus-adapter runs for the HPA: its template filled for pods in ns."""
    return (
        rule["metricsQuery"]
        .replace("<<.Series>>", series_name(rule))
        .replace("<<.LabelMatchers>>", f'namespace="ns",pod=~"{pods}"')
        .replace("<<.GroupBy>>", "pod")
    )


# NVIDIA's deploy/k8s-onprem rule, for contrast (triton-inference-server/server#8979).
NVIDIA_QUERY = (
    'avg(delta(nv_inference_queue_duration_us{namespace="ns",pod=~"a"}[1m])'
    '/(1+delta(nv_inference_request_success{namespace="ns",pod=~"a"}[1m]))) by (pod)'
)


def test_adapter_queries_compute_what_the_hpas_expect(tmp_path: Path) -> None:
    promtool = _promtool()
    rules = adapter_rules()
    (tmp_path / "empty.yml").write_text("groups: []\n")
    # Pod a: model m1 queues 2000 us per request (4 requests a minute), model m2 loaded but idle.
    # Gateway pod a has 3 + 2 requests in flight; gateway pod b has served nothing yet (only `up`);
    # gateway pod c runs the Envoy front: 1 in the control plane, Envoy 4 + 2 to Triton.
    series = [
        ('nv_inference_queue_duration_us{namespace="ns",pod="a",model="m1"}', "0+2000x8"),
        ('nv_inference_request_success{namespace="ns",pod="a",model="m1"}', "0+1x8"),
        ('nv_inference_queue_duration_us{namespace="ns",pod="a",model="m2"}', "0x8"),
        ('nv_inference_request_success{namespace="ns",pod="a",model="m2"}', "0x8"),
        ('precision_serve_inflight_requests{namespace="ns",pod="a",model="m1"}', "3x8"),
        ('precision_serve_inflight_requests{namespace="ns",pod="a",model="m2"}', "2x8"),
        ('up{namespace="ns",pod="a"}', "1x8"),
        ('up{namespace="ns",pod="b"}', "1x8"),
        ('precision_serve_inflight_requests{namespace="ns",pod="c",model="m1"}', "1x8"),
        (
            'precision_serve_envoy_upstream_active_requests{namespace="ns",pod="c",model="m1",'
            'precision="int8",protocol="grpc"}',
            "4x8",
        ),
        (
            'precision_serve_envoy_upstream_active_requests{namespace="ns",pod="c",model="m1",'
            'precision="fp32",protocol="http"}',
            "2x8",
        ),
        ('up{namespace="ns",pod="c"}', "1x8"),
    ]
    tests = {
        "rule_files": ["empty.yml"],
        "evaluation_interval": "15s",
        "tests": [
            {
                "interval": "15s",
                "input_series": [{"series": s, "values": v} for s, v in series],
                "promql_expr_test": [
                    {
                        "expr": adapter_query(rules["avg_time_queue_us"], "a"),
                        "eval_time": "2m",
                        "exp_samples": [{"labels": '{pod="a"}', "value": 2000}],
                    },
                    {  # the chart's rule reports 800 for the same pod
                        "expr": NVIDIA_QUERY,
                        "eval_time": "2m",
                        "exp_samples": [{"labels": '{pod="a"}', "value": 800}],
                    },
                    {
                        "expr": adapter_query(rules["precision_serve_inflight_requests"], "a|b|c"),
                        "eval_time": "2m",
                        "exp_samples": [
                            {"labels": '{pod="a"}', "value": 5},
                            {"labels": '{pod="b"}', "value": 0},
                            {"labels": '{pod="c"}', "value": 7},
                        ],
                    },
                ],
            }
        ],
    }
    test_file = tmp_path / "adapter_test.yml"
    test_file.write_text(yaml.safe_dump(tests, sort_keys=False))
    out = subprocess.run(
        [promtool, "test", "rules", str(test_file)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
