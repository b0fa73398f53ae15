"""deploy/ agrees with the code: routes probed, ports, volumes, settings named, commands accepted, install order.

No container engine runs here, so each file is read and checked against what it refers to. Every check is a
function returning the problems it finds; the files must have none, and each mutation below must produce the
problem it plants (so no check passes vacuously).
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

pytest.importorskip("fastapi")

from mmfusion.cli.main import make_parser  # noqa: E402
from mmfusion.serve.settings import ServeSettings  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
SETTINGS = {f.name for f in fields(ServeSettings)}
PORT = ServeSettings().port


@pytest.fixture(scope="module")
def routes() -> set[str]:
    from mmfusion.serve.app import create_app

    return set(_paths(create_app(ServeSettings()).routes))


def _paths(routes) -> list[str]:
    """The paths of routes, those of included routers too (FastAPI keeps an included router as one entry)."""
    out = []
    for r in routes:
        out += [r.path] if hasattr(r, "path") else []
        inner = getattr(r, "original_router", None)
        out += _paths(inner.routes) if inner is not None else []
    return out


# ---- reading the files -----------------------------------------------------------------------------------


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined and comments dropped."""
    out, buf = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        key, _, rest = (buf + line).partition(" ")
        out.append((key.upper(), rest.strip()))
        buf = ""
    return out


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Whether Docker leaves ``path`` out of the build context: the last pattern matching it or a parent wins."""

    def regex(p: str) -> re.Pattern:
        out, i = "", 0
        while i < len(p):
            if p.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif p.startswith("**", i):
                out, i = out + ".*", i + 2
            else:
                out += {"*": "[^/]*", "?": "[^/]"}.get(p[i], re.escape(p[i]))
                i += 1
        return re.compile(out + r"\Z")

    parts = path.split("/")
    candidates = ["/".join(parts[: k + 1]) for k in range(len(parts))]
    excluded = False
    for p in patterns:
        negate = p.startswith("!")
        if any(regex(p.lstrip("!").strip("/")).match(c) for c in candidates):
            excluded = not negate
    return excluded


def serve_args(argv: list[str]):
    """``mmfusion ...`` argv through the command's own parser: (namespace, leftovers); no command: (None, argv)."""
    if not argv or argv[0] != "mmfusion":
        return argparse.Namespace(command=None, db=None), argv
    try:
        return make_parser().parse_known_args(argv[1:])
    except SystemExit:  # argparse's own error, printed to stderr
        return argparse.Namespace(command=None, db=None), argv


def health_url(command: list[str]) -> tuple[str, str]:
    """(port, path) that a ``python -c`` healthcheck opens; the port may be an expression's default."""
    code = command[command.index("-c") + 1]
    m = re.search(r"http://127\.0\.0\.1:([^/']+)(/[\w/]*)", code)
    assert m, code
    port = m.group(1)
    if not port.isdigit():  # '%s' % os.environ.get('MMFUSION_PORT', '8000')
        port = re.search(r"MMFUSION_PORT['\"],\s*['\"](\d+)", code).group(1)
    return port, m.group(2)


def mmfusion_env_problems(names_values: dict[str, str | None], where: str) -> list[str]:
    """MMFUSION_* names must be ServeSettings fields, and literal values must parse as those fields."""
    problems, literal = [], {}
    for name, value in names_values.items():
        if not name.startswith("MMFUSION_"):
            continue
        if name[len("MMFUSION_") :].lower() not in SETTINGS:
            problems.append(f"{where}: {name} is not a ServeSettings field")
        elif value is not None and "${" not in value:
            literal[name] = value
    try:
        ServeSettings.load(env=literal)
    except Exception as e:
        problems.append(f"{where}: {e}")
    return problems


# ---- the checks ------------------------------------------------------------------------------------------


def dockerfile_problems(text: str, routes: set[str], ignore: str | None = None) -> list[str]:
    ins = instructions(text)
    ignore = (ROOT / ".dockerignore").read_text() if ignore is None else ignore
    return install_problems(ins) + context_problems(ins, ignore) + runtime_problems(ins, routes)


def install_problems(ins: list[tuple[str, str]]) -> list[str]:
    """torch pinned as the Makefile pins it, from the CPU index, before the package and its extras."""
    problems = []
    runs = [(i, arg) for i, (k, arg) in enumerate(ins) if k == "RUN"]
    pin = re.search(r"torch==([\w.+]+)", (ROOT / "Makefile").read_text()).group(1)
    torch = [i for i, a in runs if "pip install" in a and re.search(r"\btorch\b", a)]
    cpu = [i for i, a in runs if f"torch=={pin}" in a and "--index-url https://download.pytorch.org/whl/cpu" in a]
    package = [i for i, a in runs if re.search(r"pip install \S*\.\[", a)]
    if not cpu:
        problems.append(f"no RUN installs torch=={pin} (the Makefile's pin) from the CPU index")
    if torch != cpu:
        problems.append("torch is installed other than pinned from the CPU index")
    if not package:
        return problems + ["no RUN pip-installs the package with extras"]
    if cpu and min(package) < min(cpu):
        problems.append("the package is installed before the CPU torch (pip would take the CUDA build)")
    extras = set(re.search(r"\.\[([\w,]+)\]", ins[package[0]][1]).group(1).split(","))
    if not {"serve", "index", "hf"} <= extras:
        problems.append(f"the package's extras {sorted(extras)} lack serve, index or hf")
    return problems


def context_problems(ins: list[tuple[str, str]], ignore: str) -> list[str]:
    """The root .dockerignore keeps what the build copies and reads, and leaves out the bulk."""
    problems = []
    patterns = [ln.strip() for ln in ignore.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    copies = [src for k, a in ins if k == "COPY" and not a.startswith("--from") for src in a.split()[:-1]]
    readme = re.search(r'readme\s*=\s*"([^"]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    for src in [*copies, readme, "src/mmfusion/__init__.py", "src/mmfusion/serve/static/index.html"]:
        if dockerignore_excludes(patterns, src.removeprefix("./").rstrip("/") or "."):
            problems.append(f".dockerignore leaves out {src}, which the build needs")
    for big in (".venv/bin/python", "runs/demo/index/index.sqlite", ".git/HEAD", "src/mmfusion/__pycache__/x.pyc"):
        if not dockerignore_excludes(patterns, big):
            problems.append(f".dockerignore lets {big} into the build context")
    return problems


def runtime_problems(ins: list[tuple[str, str]], routes: set[str]) -> list[str]:
    """A numeric non-root user, state in the volume, the service's port, a CMD serve accepts, a real probe."""
    problems = []
    user = [a for k, a in ins if k == "USER"]
    if not user or not user[-1].split(":")[0].isdigit() or int(user[-1].split(":")[0]) == 0:
        problems.append("the last USER is not a numeric non-root uid (runAsNonRoot cannot check a name)")
    volumes = [v for k, a in ins if k == "VOLUME" for v in (json.loads(a) if a.startswith("[") else a.split())]
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(a for k, a in ins if k == "ENV")))
    if not any(env.get("HF_HOME", "").startswith(v) for v in volumes):
        problems.append(f"HF_HOME {env.get('HF_HOME')} is not in a volume {volumes}")
    exposed = [int(a.split("/")[0]) for k, a in ins if k == "EXPOSE"]
    if exposed != [PORT]:
        problems.append(f"EXPOSE {exposed}, the service's port is {PORT}")
    cmd = [json.loads(a) for k, a in ins if k == "CMD"]
    args, extra = serve_args(cmd[-1] if cmd else [])
    if getattr(args, "command", None) != "serve" or extra:
        problems.append(f"CMD {cmd} is not a valid mmfusion serve command (leftovers {extra})")
    elif args.host != "0.0.0.0":
        problems.append("CMD does not bind 0.0.0.0: a port mapping could not reach it")
    elif not any(str(args.db or "").startswith(v) for v in volumes):
        problems.append(f"CMD's --db {args.db} is not in a volume {volumes}")
    health = [a for k, a in ins if k == "HEALTHCHECK"]
    port, path = health_url(json.loads(health[-1].split(" CMD ", 1)[1])) if health else ("0", "")
    if path not in routes or int(port) not in exposed:
        problems.append(f"HEALTHCHECK opens :{port}{path}; routes have {path in routes}, exposed {exposed}")
    return problems


def compose_problems(doc: dict, routes: set[str], dockerfile: str) -> list[str]:
    problems = []
    services = doc["services"]
    serving = [s for s in services.values() if "ports" in s]
    if len(serving) != 1:
        return [f"{len(serving)} services publish ports; one should"]
    svc = serving[0]
    for mapping in svc["ports"]:
        host_ip, _, container = str(mapping).split(":")
        if host_ip != "127.0.0.1" or int(container) != PORT:
            problems.append(f"port {mapping}: should be 127.0.0.1:<host port>:{PORT}")
    env = svc.get("environment") or {}
    env = dict(e.split("=", 1) for e in env) if isinstance(env, list) else env
    problems += mmfusion_env_problems(env, "compose")
    text = yaml.safe_dump(doc)
    for name in re.findall(r"\$\{(MMFUSION_\w+?)(?::?[-?][^}]*)?\}", text):
        problems += mmfusion_env_problems({name: None}, "compose interpolation")
    if "${" not in str(env.get("MMFUSION_API_KEYS", "${}")):
        problems.append("MMFUSION_API_KEYS is written in compose.yaml; it must come from the environment or .env")
    declared = set(doc.get("volumes") or {})
    cmd = json.loads([a for k, a in instructions(dockerfile) if k == "CMD"][-1])
    db = serve_args(cmd)[0].db
    hf_home = re.search(r"HF_HOME=(\S+)", dockerfile).group(1)
    for name, s in services.items():
        mounts = {}
        for v in s.get("volumes") or []:
            source, target = re.match(r"(\$\{[^}]*\}[^:]*|[^:]+):([^:]+)", str(v)).groups()
            mounts[target] = source
            if not source.startswith(("$", ".", "/", "~")) and source not in declared:
                problems.append(f"service {name} mounts volume {source!r}, not declared under volumes")
        for needed in (db, hf_home):
            if not any(needed == t or needed.startswith(t.rstrip("/") + "/") for t in mounts):
                problems.append(f"service {name}: nothing is mounted at {needed}")
        if s.get("command"):
            args, extra = serve_args(s["command"])
            if extra or args.db != db:
                problems.append(f"service {name}: command {s['command']} has leftovers {extra} or --db {args.db}")
    if svc.get("restart") not in ("always", "unless-stopped", "on-failure"):
        problems.append(f"the service's restart policy is {svc.get('restart')!r}")
    test = svc.get("healthcheck", {}).get("test") or ["CMD", "-c", ""]
    port, path = health_url(test[1:]) if "-c" in test else ("", "")
    if path not in routes or port != str(PORT):
        problems.append(f"the healthcheck opens :{port}{path}, not a route on {PORT}")
    return problems


def k8s_problems(docs: dict[str, dict], routes: set[str], dockerfile: str) -> list[str]:
    problems = []
    kust = docs.pop("kustomization.yaml")
    if sorted(kust["resources"]) != sorted(docs):
        problems.append(f"kustomization lists {kust['resources']}, the folder holds {sorted(docs)}")
    by_kind = {d["kind"]: d for d in docs.values()}
    dep, svc, pvc = by_kind["Deployment"], by_kind["Service"], by_kind["PersistentVolumeClaim"]
    pod = dep["spec"]["template"]["spec"]
    main = pod["containers"][0]
    ports = {p.get("name"): p["containerPort"] for p in main.get("ports", [])}
    if PORT not in ports.values():
        problems.append(f"containerPort {list(ports.values())}, the service's port is {PORT}")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = (main.get(probe) or {}).get("httpGet") or {}
        port = ports.get(get.get("port"), get.get("port"))
        if get.get("path") not in routes or port != PORT:
            problems.append(f"{probe} gets {get.get('path')} on {port}: not a route on {PORT}")
    startup = main.get("startupProbe") or {}
    if startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3) < 120:
        problems.append("the startup probe gives the models under 2 minutes to load")
    for sp in svc["spec"]["ports"]:
        target = ports.get(sp["targetPort"], sp["targetPort"])
        if target != PORT or sp["port"] != PORT:
            problems.append(f"Service port {sp['port']} -> {sp['targetPort']}, the container listens on {PORT}")
    if svc["spec"].get("type", "ClusterIP") != "ClusterIP":
        problems.append("the Service is not ClusterIP")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    if any(labels.get(k) != v for k, v in svc["spec"]["selector"].items()):
        problems.append("the Service's selector does not match the pods' labels")
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v
    }
    if set(claims.values()) != {pvc["metadata"]["name"]}:
        problems.append(f"the pod claims {claims}, the PVC is {pvc['metadata']['name']}")
    empty = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
    db = serve_args(json.loads([a for k, a in instructions(dockerfile) if k == "CMD"][-1]))[0].db
    uid = int([a for k, a in instructions(dockerfile) if k == "USER"][-1].split(":")[0])
    ctx = pod.get("securityContext") or {}
    if not ctx.get("runAsNonRoot") or ctx.get("runAsUser", uid) != uid:
        problems.append(f"the pod does not run as non-root uid {uid}: {ctx}")
    for c in pod.get("initContainers", []) + pod["containers"]:
        mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
        if not any(claims.get(n) and (db == p or db.startswith(p.rstrip("/") + "/")) for p, n in mounts.items()):
            problems.append(f"{c['name']}: the PVC is not mounted over {db}")
        sc = c.get("securityContext") or {}
        if sc.get("readOnlyRootFilesystem") and mounts.get("/tmp") not in empty:
            problems.append(f"{c['name']}: a read-only root needs an emptyDir at /tmp")
        res = c.get("resources") or {}
        if not all(res.get(k, {}).get(r) for k in ("requests", "limits") for r in ("cpu", "memory")):
            problems.append(f"{c['name']}: requests and limits of cpu and memory are not all set")
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        problems += mmfusion_env_problems(env, c["name"])
        if any(e["name"] == "MMFUSION_API_KEYS" and "value" in e for e in c.get("env", [])):
            problems.append(f"{c['name']}: MMFUSION_API_KEYS is written in the manifest; it must come from a Secret")
        command = c.get("command") or c.get("args")
        if command:
            args, extra = serve_args(command)
            if extra or args.db != db:
                problems.append(f"{c['name']}: command {command} has leftovers {extra} or --db {args.db}")
    return problems


# ---- the files have none of these problems ---------------------------------------------------------------


def dockerfile() -> str:
    return (DEPLOY / "Dockerfile").read_text()


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def k8s() -> dict[str, dict]:
    return {p.name: yaml.safe_load(p.read_text()) for p in sorted((DEPLOY / "k8s").glob("*.yaml"))}


def test_dockerfile_agrees_with_the_code(routes):
    assert dockerfile_problems(dockerfile(), routes) == []


def test_compose_agrees_with_the_code(routes):
    assert compose_problems(compose(), routes, dockerfile()) == []


def test_k8s_agrees_with_the_code(routes):
    assert k8s_problems(k8s(), routes, dockerfile()) == []


def test_healthcheck_commands_pass_on_a_live_service_and_fail_without_one(routes):
    """The Dockerfile's and compose's healthcheck commands, run as they are, against the real app."""
    from mmfusion.serve.app import create_app
    from tests.serve.conftest import free_port, run_server

    docker = json.loads([a for k, a in instructions(dockerfile()) if k == "HEALTHCHECK"][-1].split(" CMD ", 1)[1])
    compose_cmd = compose()["services"]["mmfusion"]["healthcheck"]["test"][1:]
    with run_server(create_app(ServeSettings())) as url:
        port = url.rsplit(":", 1)[1]
        for cmd in (docker, [c.replace(f":{PORT}/", f":{port}/") for c in compose_cmd]):
            env = {"MMFUSION_PORT": port, "PATH": ""}
            assert subprocess.run([sys.executable, *cmd[1:]], env=env, timeout=30).returncode == 0, cmd
    closed = str(free_port())
    done = subprocess.run([sys.executable, *docker[1:]], env={"MMFUSION_PORT": closed}, capture_output=True)
    assert done.returncode != 0


# ---- and each check finds the mistake planted in it ------------------------------------------------------


PACKAGE = 'RUN pip install ".[serve,index,hf]"'
DOCKERFILE_MISTAKES = {
    "torch from PyPI": (" --index-url https://download.pytorch.org/whl/cpu", "", "CPU index"),
    "another torch": ("torch==2.13.0", "torch==2.5.0", "CPU index"),
    "no package": (PACKAGE, "", "no RUN pip-installs"),
    "package first": ("RUN pip install torch", PACKAGE + "\nRUN pip install torch", "before the CPU torch"),
    "missing extra": (".[serve,index,hf]", ".[serve,hf]", "lack serve"),
    "root": ("USER 10001:10001", "USER mmfusion", "numeric non-root"),
    "port": ("EXPOSE 8000", "EXPOSE 8080", "EXPOSE [8080]"),
    "loopback": ('"--host", "0.0.0.0"', '"--host", "127.0.0.1"', "does not bind 0.0.0.0"),
    "bad flag": ('"--db", "/data/index"', '"--database", "/data/index"', "not a valid mmfusion serve"),
    "other command": ('"mmfusion", "serve"', '"mmfusion", "serv"', "not a valid mmfusion serve"),
    "no command": ('CMD ["mmfusion"', 'ENTRYPOINT ["mmfusion"', "not a valid mmfusion serve"),
    "db outside": ('"--db", "/data/index"', '"--db", "/srv/index"', "not in a volume"),
    "cache outside": ("HF_HOME=/data/hf", "HF_HOME=/root/hf", "HF_HOME"),
    "probe path": ("/healthz' %", "/health' %", "HEALTHCHECK opens"),
}


@pytest.mark.parametrize("name", DOCKERFILE_MISTAKES)
def test_dockerfile_checks_catch(name, routes):
    old, new, expected = DOCKERFILE_MISTAKES[name]
    text = dockerfile()
    assert old in text, old
    problems = dockerfile_problems(text.replace(old, new), routes)
    assert any(expected in p for p in problems), (expected, problems)


@pytest.mark.parametrize(
    "old, new, expected",
    [("!README.md\n", "", "leaves out README.md"), ("*\n", "", "lets .venv/bin/python"),
     ("**/__pycache__\n", "", "lets src/mmfusion/__pycache__"), ("!src\n", "!src/mmfusion/*.py\n", "leaves out src")],
)  # fmt: skip
def test_dockerignore_checks_catch(old, new, expected, routes):
    ignore = (ROOT / ".dockerignore").read_text()
    assert old in ignore, old
    problems = dockerfile_problems(dockerfile(), routes, ignore.replace(old, new, 1))
    assert any(expected in p for p in problems), (expected, problems)


def test_dockerignore_matching():
    patterns = ["*", "!src", "!README.md", "**/__pycache__"]
    assert not dockerignore_excludes(patterns, "src/mmfusion/cli/main.py")
    assert dockerignore_excludes(patterns, "src/mmfusion/__pycache__/main.cpython-311.pyc")
    assert dockerignore_excludes(patterns, ".venv/bin/python") and dockerignore_excludes(patterns, "pyproject.toml")
    assert dockerignore_excludes([".venv"], ".venv/lib/x.py") and not dockerignore_excludes([".venv"], "src/a.py")


def _set(doc: dict, path: str, value) -> dict:
    doc = copy.deepcopy(doc)
    *parents, last = path.split(".")
    node = doc
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node[p]
    if value is _DELETE:
        del node[int(last) if isinstance(node, list) else last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return doc


_DELETE = object()
COMPOSE_MISTAKES = {
    "exposed": ("services.mmfusion.ports.0", "0.0.0.0:8000:8000", "should be 127.0.0.1"),
    "wrong port": ("services.mmfusion.ports.0", "127.0.0.1:8000:8080", "should be 127.0.0.1"),
    "unknown setting": ("services.mmfusion.environment.MMFUSION_BATCH", "8", "not a ServeSettings field"),
    "bad value": ("services.mmfusion.environment.MMFUSION_MAX_BATCH_SIZE", "many", "max_batch_size"),
    "key in file": ("services.mmfusion.environment.MMFUSION_API_KEYS", "secret123", "written in compose.yaml"),
    "undeclared volume": ("volumes.index", _DELETE, "not declared"),
    "no cache": ("services.mmfusion.volumes.1", "hf-cache:/cache", "nothing is mounted at /data/hf"),
    "index elsewhere": ("services.index.command.4", "/data/other", "--db /data/other"),
    "no restart": ("services.mmfusion.restart", _DELETE, "restart policy"),
    "probe path": ("services.mmfusion.healthcheck.test.3", "import urllib.request; urllib.request.urlopen("
                   "'http://127.0.0.1:8000/ready')", "healthcheck opens"),
}  # fmt: skip


@pytest.mark.parametrize("name", COMPOSE_MISTAKES)
def test_compose_checks_catch(name, routes):
    path, value, expected = COMPOSE_MISTAKES[name]
    doc = compose()
    if name == "no cache":  # each service has its own copy after the change
        doc["services"]["mmfusion"]["volumes"] = list(doc["services"]["mmfusion"]["volumes"])
    problems = compose_problems(_set(doc, path, value), routes, dockerfile())
    assert any(expected in p for p in problems), (expected, problems)


POD = "spec.template.spec."
MAIN = POD + "containers.0."
K8S_MISTAKES = {
    "probe path": ("deployment.yaml", MAIN + "livenessProbe.httpGet.path", "/live", "livenessProbe gets /live"),
    "probe port": ("deployment.yaml", MAIN + "readinessProbe.httpGet.port", 9000, "readinessProbe gets"),
    "container port": ("deployment.yaml", MAIN + "ports.0.containerPort", 8080, "containerPort [8080]"),
    "short startup": ("deployment.yaml", MAIN + "startupProbe.failureThreshold", 3, "under 2 minutes"),
    "service port": ("service.yaml", "spec.ports.0.targetPort", "web", "Service port"),
    "selector": ("service.yaml", "spec.selector", {"app.kubernetes.io/name": "other"}, "selector"),
    "claim": ("pvc.yaml", "metadata.name", "photos", "the PVC is photos"),
    "root": ("deployment.yaml", POD + "securityContext.runAsNonRoot", False, "non-root uid"),
    "other uid": ("deployment.yaml", POD + "securityContext.runAsUser", 1000, "non-root uid 10001"),
    "no tmp": ("deployment.yaml", MAIN + "volumeMounts.1.mountPath", "/scratch", "emptyDir at /tmp"),
    "not on pvc": ("deployment.yaml", MAIN + "volumeMounts.0.mountPath", "/srv", "not mounted over /data/index"),
    "no limits": ("deployment.yaml", MAIN + "resources.limits", _DELETE, "limits of cpu and memory"),
    "unknown setting": ("deployment.yaml", MAIN + "env.1.name", "MMFUSION_BATCH", "not a ServeSettings field"),
    "key in file": ("deployment.yaml", MAIN + "env.0", {"name": "MMFUSION_API_KEYS", "value": "k"}, "from a Secret"),
    "init db": ("deployment.yaml", POD + "initContainers.0.command.4", "/tmp/index", "--db /tmp/index"),
    "unlisted": ("kustomization.yaml", "resources.2", _DELETE, "kustomization lists"),
}


@pytest.mark.parametrize("name", K8S_MISTAKES)
def test_k8s_checks_catch(name, routes):
    file, path, value, expected = K8S_MISTAKES[name]
    docs = k8s()
    docs[file] = _set(docs[file], path, value)
    problems = k8s_problems(docs, routes, dockerfile())
    assert any(expected in p for p in problems), (expected, problems)


def test_the_training_job_agrees_with_torchrun_and_the_cli():
    """deploy/k8s/train: an indexed Job whose pods meet at pod 0 through the headless Service, each running
    torchrun with the nodes the Job has, and a train command the CLI accepts."""
    from mmfusion.cli.main import make_parser

    docs = {p.name: yaml.safe_load(p.read_text()) for p in sorted((DEPLOY / "k8s" / "train").glob("*.yaml"))}
    job, svc = docs["job.yaml"], docs["service.yaml"]
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    cmd = pod["containers"][0]["command"]
    opts = dict(a[2:].split("=", 1) for a in cmd if a.startswith("--") and "=" in a and a.index("--") == 0)
    assert cmd[0] == "torchrun" and spec["completionMode"] == "Indexed"
    assert int(opts["nnodes"]) == spec["completions"] == spec["parallelism"]
    assert pod["subdomain"] == svc["metadata"]["name"] and svc["spec"]["clusterIP"] == "None"
    host, port = opts["rdzv-endpoint"].split(":")
    assert host == f"{job['metadata']['name']}-0.{svc['metadata']['name']}"
    assert int(port) in [p["port"] for p in svc["spec"]["ports"]]
    i = cmd.index("-m")
    assert cmd[i + 1] == "mmfusion"
    args, extra = make_parser().parse_known_args(cmd[i + 2 :])
    assert args.task == "clip" and all(e.startswith("--train.") for e in extra)
    assert set(docs["kustomization.yaml"]["resources"]) == {"job.yaml", "service.yaml"}
