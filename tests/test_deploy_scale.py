"""deploy/compose.scale.yaml and deploy/k8s/scale agree with the code: every mmfusion command parses, the API
replicas read snapshots and only enqueue, one indexer publishes, workers take jobs from the same Redis, settings
named in the environment exist, and the cluster objects point at each other. As in test_deploy.py, each check
returns the problems it finds, and each mutation must produce the problem it plants."""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import pytest
import yaml

pytest.importorskip("fastapi")

from tests.test_deploy import DEPLOY, PORT, mmfusion_env_problems, serve_args  # noqa: E402

SCALE = DEPLOY / "k8s" / "scale"
_DEFAULT = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def expand(text: str, env: dict[str, str] | None = None) -> str:
    """${VAR:-default} as compose expands it (the default, or the value given); $VAR / "$VAR" from ``env``."""
    text = _DEFAULT.sub(lambda m: (env or {}).get(m.group(1), m.group(2) or ""), text)
    return re.sub(r"\$(\w+)", lambda m: (env or {}).get(m.group(1), m.group(0)), text)


def argv_of(command: list[str], env: dict[str, str] | None = None) -> list[str]:
    """The mmfusion argv a container runs: the list itself, or what ``sh -c "exec mmfusion ..."`` runs."""
    if command[:2] == ["sh", "-c"]:
        return shlex.split(expand(command[2], env).removeprefix("exec "))
    return [expand(a, env) for a in command]


def parsed(command: list[str], env: dict[str, str] | None = None):
    args, extra = serve_args(argv_of(command, env))
    return args, extra


# ---- compose ---------------------------------------------------------------------------------------------


def compose_scale_problems(doc: dict, nginx: str) -> list[str]:
    problems = []
    s = doc["services"]
    for name in ("redis", "milvus", "indexer", "api", "worker", "proxy"):
        if name not in s:
            problems.append(f"no {name} service")
    if problems:
        return problems
    if "--appendonly" not in s["redis"]["command"] or "yes" not in s["redis"]["command"]:
        problems.append("redis runs without AOF: an acknowledged job would not survive a restart")
    if not str(s["milvus"]["image"]).startswith("milvusdb/milvus:"):
        problems.append(f"milvus image {s['milvus']['image']} is not the official one")
    published = [n for n, svc in s.items() if svc.get("ports")]
    if published != ["proxy"]:
        problems.append(f"services publishing ports: {published}; only the proxy should")
    for mapping in s["proxy"].get("ports", []):
        host_ip, _, container = str(mapping).split(":")
        if host_ip != "127.0.0.1":
            problems.append(f"the proxy publishes {mapping}, not on the host's loopback")
        if f"listen {container};" not in nginx:
            problems.append(f"the proxy publishes container port {container}, nginx does not listen there")
    if not re.search(rf"server\s+api:{PORT}\b", nginx):
        problems.append(f"nginx's upstream is not the api service on {PORT}")
    api, extra = parsed(s["api"]["command"])
    if getattr(api, "command", None) != "serve" or extra:
        problems.append(f"api command {s['api']['command']} is not a valid serve command (leftovers {extra})")
    else:
        if not api.snapshots or api.worker is not False:
            problems.append("the API replicas must read snapshots (--snapshots) and run no jobs (--no-worker)")
        if (s["api"].get("deploy") or {}).get("replicas", 1) < 2:
            problems.append("the api service runs one replica")
    env = {**(s["api"].get("environment") or {})}
    problems += mmfusion_env_problems({k: expand(str(v)) for k, v in env.items()}, "api")
    redis_url = expand(str(env.get("MMFUSION_REDIS_URL", "")))
    if not redis_url.startswith("redis://redis:"):
        problems.append(f"the API's Redis is {redis_url!r}, not the redis service")
    if "${" not in str(env.get("MMFUSION_API_KEYS", "${}")):
        problems.append("MMFUSION_API_KEYS is written in the file; it must come from the environment or .env")
    ix, extra = parsed(s["indexer"]["command"])
    if getattr(ix, "command", None) != "index" or extra:
        problems.append(f"indexer command {s['indexer']['command']} does not parse (leftovers {extra})")
    else:
        if not ix.publish:
            problems.append("the indexer does not publish snapshots (--publish)")
        if api.db != ix.db:
            problems.append(f"the indexer writes {ix.db}, the API reads {api.db}")
        if not str(ix.vectors or "").startswith("milvus://milvus:"):
            problems.append(f"the indexer's vectors {ix.vectors} are not in the milvus service")
    wk, extra = parsed(s["worker"]["command"])
    if getattr(wk, "command", None) != "worker" or extra:
        problems.append(f"worker command {s['worker']['command']} does not parse (leftovers {extra})")
    elif expand(str(wk.redis_url or "")) != redis_url:
        problems.append(f"the worker's Redis {wk.redis_url} is not the API's {redis_url}")
    declared = set(doc.get("volumes") or {})
    for name, svc in s.items():
        for v in svc.get("volumes") or []:
            source = str(v).split(":")[0]
            if not source.startswith(("$", ".", "/")) and source not in declared:
                problems.append(f"service {name} mounts {source}, not declared")
            if source.startswith("./") and not (DEPLOY / source).is_file():
                problems.append(f"service {name} mounts {source}, which deploy/ does not have")
    return problems


def test_compose_scale_agrees_with_the_code():
    doc = yaml.safe_load((DEPLOY / "compose.scale.yaml").read_text())
    assert compose_scale_problems(doc, (DEPLOY / "nginx.scale.conf").read_text()) == []


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda d: d["services"]["api"]["command"].remove("--no-worker"), "run no jobs"),
        (lambda d: d["services"]["indexer"]["command"].remove("--publish"), "does not publish"),
        (lambda d: d["services"]["worker"]["command"].__setitem__(3, "redis://other:6379/0"), "not the API's"),
        (lambda d: d["services"]["redis"]["command"].remove("--appendonly"), "without AOF"),
        (lambda d: d["services"]["api"].__setitem__("ports", ["8001:8000"]), "only the proxy"),
        (lambda d: d["services"]["api"]["environment"].__setitem__("MMFUSION_NO_SUCH", "1"), "not a ServeSettings"),
    ],
)
def test_compose_scale_checks_catch(mutate, expected):
    doc = yaml.safe_load((DEPLOY / "compose.scale.yaml").read_text())
    mutate(doc)
    problems = compose_scale_problems(doc, (DEPLOY / "nginx.scale.conf").read_text())
    assert any(expected in p for p in problems), problems


# ---- kubernetes ------------------------------------------------------------------------------------------


def load_scale() -> dict[str, dict]:
    return {p.name: yaml.safe_load(p.read_text()) for p in sorted(SCALE.glob("*.yaml"))}


def base() -> dict[str, dict]:
    return {p.name: yaml.safe_load(p.read_text()) for p in sorted((DEPLOY / "k8s").glob("*.yaml"))}


def k8s_scale_problems(docs: dict[str, dict], base_docs: dict[str, dict]) -> list[str]:
    problems = []
    kust = docs["kustomization.yaml"]
    listed = [r for r in kust["resources"] if r != "../"] + [p["path"] for p in kust.get("patches", [])]
    if "../" not in kust["resources"]:
        problems.append("the overlay does not build on deploy/k8s")
    if sorted(listed) != sorted(n for n in docs if n != "kustomization.yaml"):
        problems.append(f"kustomization lists {sorted(listed)}, the folder holds {sorted(docs)}")
    by_kind = {d["kind"]: d for d in base_docs.values() if "kind" in d and d["kind"] != "Kustomization"}
    dep, pvc = by_kind["Deployment"], by_kind["PersistentVolumeClaim"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    config = docs["config.yaml"]["data"]
    problems += mmfusion_env_problems({k: v for k, v in config.items()}, "config.yaml")
    api = docs["api-patch.yaml"]
    if api["metadata"]["name"] != dep["metadata"]["name"]:
        problems.append("api-patch names another Deployment than the base's")
    if api["spec"].get("replicas", 1) < 3:
        problems.append("the API runs fewer than 3 replicas")
    container = api["spec"]["template"]["spec"]["containers"][0]
    args, extra = parsed(container["command"], config)
    if getattr(args, "command", None) != "serve" or extra or not args.snapshots or args.worker is not False:
        problems.append(f"the API's command {container['command']} is not serve --snapshots --no-worker")
    refs = [e["configMapRef"]["name"] for e in container.get("envFrom", [])]
    if refs != [docs["config.yaml"]["metadata"]["name"]]:
        problems.append(f"the API reads ConfigMaps {refs}")
    if docs["pvc-patch.yaml"]["metadata"]["name"] != pvc["metadata"]["name"]:
        problems.append("pvc-patch names another claim than the base's")
    if "ReadWriteMany" not in docs["pvc-patch.yaml"]["spec"]["accessModes"]:
        problems.append("the shared volume is not ReadWriteMany")
    worker = docs["worker.yaml"]["spec"]["template"]["spec"]
    wargs, extra = parsed(worker["containers"][0]["command"], config)
    if getattr(wargs, "command", None) != "worker" or extra or wargs.redis_url != config["MMFUSION_REDIS_URL"]:
        problems.append(f"the worker's command does not take jobs from {config['MMFUSION_REDIS_URL']}")
    cron = docs["indexer.yaml"]["spec"]
    if cron.get("concurrencyPolicy") != "Forbid":
        problems.append("the indexer CronJob may run two writers at once")
    index = cron["jobTemplate"]["spec"]["template"]["spec"]
    iargs, extra = parsed(index["containers"][0]["command"], config)
    if getattr(iargs, "command", None) != "index" or extra or not iargs.publish or iargs.db != args.db:
        problems.append("the indexer does not publish the index the API reads")
    for name, pod in (("worker", worker), ("indexer", index)):
        claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
        if claims != {pvc["metadata"]["name"]}:
            problems.append(f"the {name} claims {claims}")
        if not (pod.get("securityContext") or {}).get("runAsNonRoot"):
            problems.append(f"the {name} may run as root")
        for c in pod["containers"]:
            res = c.get("resources") or {}
            if not all(res.get(k, {}).get(r) for k in ("requests", "limits") for r in ("cpu", "memory")):
                problems.append(f"{name}: requests and limits of cpu and memory are not all set")
    pdb = docs["pdb.yaml"]["spec"]
    if any(labels.get(k) != v for k, v in pdb["selector"]["matchLabels"].items()):
        problems.append("the PodDisruptionBudget selects other pods than the API's")
    hpa = docs["hpa.yaml"]["spec"]
    if hpa["scaleTargetRef"]["name"] != dep["metadata"]["name"]:
        problems.append("the autoscaler targets another Deployment")
    if hpa["minReplicas"] <= pdb["minAvailable"]:
        problems.append("minReplicas leaves no room for the disruption budget")
    probes = dep["spec"]["template"]["spec"]["containers"][0]
    if not all(probes.get(p) for p in ("readinessProbe", "livenessProbe", "startupProbe")):
        problems.append("the base Deployment lost a probe")
    return problems


def test_k8s_scale_agrees_with_the_code():
    assert k8s_scale_problems(load_scale(), base()) == []


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda d: d["api-patch.yaml"]["spec"].__setitem__("replicas", 1), "fewer than 3"),
        (lambda d: d["indexer.yaml"]["spec"].__setitem__("concurrencyPolicy", "Allow"), "two writers"),
        (lambda d: d["hpa.yaml"]["spec"]["scaleTargetRef"].__setitem__("name", "x"), "another Deployment"),
        (
            lambda d: d["pdb.yaml"]["spec"]["selector"]["matchLabels"].__setitem__("app.kubernetes.io/name", "x"),
            "other pods",
        ),
        (lambda d: d["config.yaml"]["data"].__setitem__("MMFUSION_NO_SUCH", "1"), "not a ServeSettings"),
        (lambda d: d["pvc-patch.yaml"]["spec"].__setitem__("accessModes", ["ReadWriteOnce"]), "ReadWriteMany"),
    ],
)
def test_k8s_scale_checks_catch(mutate, expected):
    docs = copy.deepcopy(load_scale())
    mutate(docs)
    problems = k8s_scale_problems(docs, base())
    assert any(expected in p for p in problems), problems


def test_the_expansion_helpers():
    assert expand("${A:-x}/${B}", {"B": "y"}) == "x/y"
    assert argv_of(["sh", "-c", 'exec mmfusion worker --redis "$R"'], {"R": "redis://h:1/0"}) == [
        "mmfusion", "worker", "--redis", "redis://h:1/0"
    ]  # fmt: skip
    assert Path(SCALE).is_dir()
