"""The closed loop's commands: ``serve split``, ``ab report`` and ``loop``.

Registered by the CLI: ``serve_app.command("split")(serve_split)``,
``app.add_typer(ab_app, name="ab")`` and ``app.command("loop")(loop_command)``.
"""

from __future__ import annotations

import os
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from ragops.commands.common import (
    ConfigOpt,
    DataDirOpt,
    JsonOpt,
    SetOpt,
    emit_json,
    err,
    handle_errors,
    out,
    settings_from,
)
from ragops.errors import InputError, RagopsError

ab_app = typer.Typer(help="A/B tests of served variants: per-variant ratings, latency, errors and a verdict.",
                     no_args_is_help=True)  # fmt: skip

#: Environment variable holding the admin key `serve split` sends (else the server's first admin key).
ADMIN_KEY_ENV = "RAGOPS_ADMIN_KEY"
#: The chat key `loop --server` evaluates with (else the server's first chat key, else its admin key).
CHAT_KEY_ENV = "RAGOPS_API_KEY"


def _chat_key() -> str | None:
    from ragops.serve.auth import ADMIN_KEYS_ENV, CHAT_KEYS_ENV

    if os.environ.get(CHAT_KEY_ENV):
        return os.environ[CHAT_KEY_ENV]
    for env in (CHAT_KEYS_ENV, ADMIN_KEYS_ENV):
        keys = [k.strip() for k in os.environ.get(env, "").split(",") if k.strip()]
        if keys:
            return keys[0]
    return None


def _admin_key(explicit: str | None) -> str | None:
    if explicit:
        return explicit
    if os.environ.get(ADMIN_KEY_ENV):
        return os.environ[ADMIN_KEY_ENV]
    from ragops.serve.auth import ADMIN_KEYS_ENV

    keys = [k.strip() for k in os.environ.get(ADMIN_KEYS_ENV, "").split(",") if k.strip()]
    return keys[0] if keys else None


def _server_url(settings: Any, url: str | None) -> str:
    if url:
        return url.rstrip("/")
    host = settings.serve.host if settings.serve.host not in ("0.0.0.0", "::") else "127.0.0.1"
    return f"http://{f'[{host}]' if ':' in host else host}:{settings.serve.port}"


def _post_route(url: str, key: str | None, body: dict[str, Any]) -> dict[str, Any]:
    """``POST /v1/admin/routes`` on a running server; one readable error for every failure."""
    import httpx

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        resp = httpx.post(f"{url}/v1/admin/routes", json=body, headers=headers, timeout=30.0)
    except httpx.HTTPError as exc:
        raise RagopsError(
            f"no ragops server answered at {url} ({type(exc).__name__}); start one with `ragops serve`, pass --url, "
            "or store the split for the next start with --offline"
        ) from None
    try:
        data = resp.json()
    except ValueError:
        data = {}
    if resp.status_code >= 400:
        message = (data.get("error") or {}).get("message") if isinstance(data, dict) else None
        hint = f" (send an admin key: --api-key or {ADMIN_KEY_ENV})" if resp.status_code in (401, 403) else ""
        raise InputError(f"the server refused the split ({resp.status_code}): {message or resp.text[:200]}{hint}")
    return data


@handle_errors
def serve_split(
    name: Annotated[str, typer.Argument(help="The public model name to split (e.g. ragops, or an alias such as prod).")],
    weights: Annotated[
        Optional[str],
        typer.Option("--weights", help="VARIANT=WEIGHT,... summing to 1, e.g. sft-v3=0.5,ppo-v1=0.5 (artifacts, aliases, "
                     "adapters or the base model)."),
    ] = None,
    clear: Annotated[bool, typer.Option("--clear", help="Remove the runtime split (the config's serve.routes applies again).")] = False,
    note: Annotated[Optional[str], typer.Option("--note", help="Why (kept in the split's change log).")] = None,
    url: Annotated[Optional[str], typer.Option("--url", help="Server URL (default: http://<serve.host>:<serve.port>).")] = None,
    api_key: Annotated[Optional[str], typer.Option("--api-key", help=f"Admin key (default: ${ADMIN_KEY_ENV}).")] = None,
    offline: Annotated[
        bool, typer.Option("--offline", help="Write the split to the registry without a running server (applies at its next start).")
    ] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Change a traffic split at runtime: no restart, no dropped request.

    Goes through the running server's admin endpoint (POST /v1/admin/routes, admin key
    required), which validates the weights (known variants, each >= 0, summing to 1) and stores
    them in the registry; every ingress replica follows within seconds. Users stay on their
    variant while the weights stand (sticky by the OpenAI `user`, x-ragops-user or the API key).
    """
    from ragops.serve.routing import parse_weights

    if clear == (weights is not None):
        raise InputError("give either --weights VARIANT=WEIGHT,... or --clear")
    parsed = None if clear else parse_weights(weights or "")
    settings = settings_from(config, set_, data_dir)
    if offline:
        from ragops.serve.models import ModelCatalog

        result = ModelCatalog(settings).set_route(name, parsed, by="cli", note=note)
    else:
        result = _post_route(_server_url(settings, url), _admin_key(api_key), {"name": name, "weights": parsed, "note": note})
        result.pop("object", None)
    if as_json:
        emit_json(result)
        return
    now = result.get("weights")
    if not now:
        out.print(f"{name}: no split now (requests for it are answered by what the name resolves to)")
        return
    table = Table("variant", "weight", title=f"split of '{name}'" + (f" (was {result['previous']})" if result.get("previous") else ""),
                  title_justify="left")  # fmt: skip
    for variant, w in now.items():
        table.add_row(variant, f"{w:g}")
    out.print(table)


def _fmt(value: Any, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


@ab_app.command("report")
@handle_errors
def ab_report_command(
    name: Annotated[str, typer.Argument(help="The split's public model name (what clients send as `model`).")],
    since: Annotated[
        Optional[str],
        typer.Option("--since", help="Window start: 30m, 2h, 7d, an ISO date/time or Unix seconds (default: when the "
                     "current split was set, else the whole log)."),
    ] = None,
    control: Annotated[Optional[str], typer.Option("--control", help="Variant A (default: the largest weight).")] = None,
    min_effect: Annotated[Optional[float], typer.Option("--min-effect", help="Smallest up-rate difference to detect (loop.ab.min_effect).")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Per variant: requests, ratings, up-rate with a Wilson interval, p50/p99 latency, error rate, and a verdict.

    Reads the request log and the feedback (serve.feedback_dir). The verdict compares each
    variant (B) with the control (A) by a two-proportion test planned for loop.ab.min_effect,
    alpha and power: until each has the ratings the plan needs it says `not enough data` and how
    many more; then `B better`, `B worse` or `no clear difference`.
    """
    from ragops.llmops.abtest import ab_report, iso_to_unix, parse_since
    from ragops.serve.feedback import feedback_dir
    from ragops.serve.models import ModelCatalog

    settings = settings_from(config, set_, data_dir)
    catalog = ModelCatalog(settings)
    weights = catalog.routes(fresh=True).get(name)
    start = parse_since(since)
    if start is None and weights and (store := catalog.route_store()) is not None:
        history = store.history(name)
        if history and name in store.weights():
            start = iso_to_unix(history[-1]["at"])  # the current weights' start: users were assigned by them
    ab = settings.loop.ab
    report = ab_report(feedback_dir(settings), name, since=start, control=control, weights=weights,
                       min_effect=min_effect or ab.min_effect, alpha=ab.alpha, power=ab.power, confidence=ab.confidence)  # fmt: skip
    if as_json:
        emit_json(report)
        return
    if not report["variants"]:
        out.print(f"no requests for '{name}' in the window (clients must send \"model\": \"{name}\")")
        return
    conf = int(round(ab.confidence * 100))
    table = Table("variant", "weight", "requests", "ratings", f"up-rate [{conf}% CI]", "p50 s", "p99 s", "errors",
                  title=f"A/B report of '{name}'", title_justify="left")  # fmt: skip
    for v in report["variants"]:
        ci = v["up_rate_interval"]
        rate = "-" if v["up_rate"] is None else f"{v['up_rate']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"
        label = v["variant"] + (" (A)" if v["variant"] == report["control"] else "")
        table.add_row(label, _fmt(v["weight"], "g"), str(v["requests"]), str(v["ratings"]), rate,
                      _fmt(v["p50_latency_s"]), _fmt(v["p99_latency_s"]), _fmt(v["error_rate"], ".1%"))  # fmt: skip
    out.print(table)
    for c in report["comparisons"]:
        line = f"{c['variant']} vs {c['control']}: [bold]{c['verdict']}[/]"
        if c["verdict"] == "not enough data":
            line += (f" (the plan needs {c['needed_per_variant']} ratings per variant: {c['more_needed']['A']} more for A, "
                     f"{c['more_needed']['B']} more for B)")  # fmt: skip
        else:
            line += f" (difference {c['difference']:+.3f}, p = {c['p_value']:.3g})"
        out.print(line)


@handle_errors
def loop_command(
    alias: Annotated[str, typer.Argument(help="The registry alias to improve (its target is the control).")],
    decide: Annotated[bool, typer.Option("--decide", help="Read the canary's A/B report: promote, roll back, or wait.")] = False,
    eval_data: Annotated[Optional[str], typer.Option("--eval-data", help="Questions with answers for the gate (loop.eval_data).")] = None,
    canary: Annotated[Optional[float], typer.Option("--canary", min=0.0, max=1.0, help="Candidate's traffic share (loop.canary).")] = None,
    route: Annotated[Optional[str], typer.Option("--route", help="Served name to split (default: the alias).")] = None,
    server: Annotated[
        Optional[str],
        typer.Option("--server", help="Evaluate through this running server (loop.server_url; needed while it holds the "
                     f"embedded index). Chat key: ${CHAT_KEY_ENV}."),
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """One pass of the LLMOps loop: feedback → reward model → PPO → eval → gate → canary split.

    Takes the feedback since the alias' previous loop, trains a reward model when there are
    enough preference pairs (loop.min_pairs), runs PPO from the alias' current target, evaluates
    both on --eval-data, and if the candidate passes the gate (loop.gate_metric) splits the
    alias' traffic {control: 1-c, candidate: c}. Later, `--decide` reads the A/B report and
    promotes the candidate or rolls the split back. State lives in the registry (loops/<alias>/):
    a loop killed at any step continues where it stopped when started again.
    """
    from ragops.llmops.loop import LoopRunner

    overrides = list(set_ or [])
    if eval_data is not None:
        overrides.append(f"loop.eval_data={eval_data}")
    if canary is not None:
        overrides.append(f"loop.canary={canary}")
    if server is not None:
        overrides.append(f"loop.server_url={server}")
    settings = settings_from(config, overrides, data_dir)

    def on_event(step: str, info: dict[str, Any]) -> None:
        if step == "eval.progress":
            return
        if step == "resume":
            err.print(f"continuing loop {info['loop']} at step '{info['next']}'")
        elif step == "collect":
            err.print(f"loop {info['loop']}: {info['records']} feedback record(s); control {info['control']}")
        elif info.get("status") == "running":
            err.print(f"[bold]{step}[/] …")
        elif step in ("reward", "ppo", "eval", "gate", "canary"):
            err.print(f"{step}: {_step_line(step, info)}", highlight=False)
        elif step.endswith(".run"):
            err.print(f"  {'resuming' if info.get('resumed') else 'run'} {info.get('run_id')}")

    runner = LoopRunner(settings, alias, route=route, on_event=on_event, api_key=_chat_key())
    rec = runner.decide() if decide else runner.run()
    if as_json:
        emit_json(rec.to_dict())
        return
    out.print(_summary(rec))


def _step_line(step: str, info: dict[str, Any]) -> str:
    if info.get("status") == "skipped":
        return f"skipped ({info.get('reason')})"
    if step in ("reward", "ppo"):
        return f"{info.get('artifact')} (run {info.get('run_id')})"
    if step == "eval":
        return ", ".join(f"{role} answer_f1={_fmt((info.get(role) or {}).get('answer_f1'))}" for role in ("control", "candidate"))
    if step == "gate":
        return "passed" if info.get("passed") else f"refused: {info.get('reason')}"
    return ", ".join(f"{k}={v:g}" for k, v in (info.get("weights") or {}).items())


def _summary(rec: Any) -> str:
    if rec.status == "canary":
        d = rec.decision
        if d:
            c = d["comparison"]
            return (f"{rec.id}: not enough data yet — the plan needs {c['needed_per_variant']} ratings per variant "
                    f"({c['more_needed']['A']} more for {rec.control}, {c['more_needed']['B']} more for {rec.candidate})")  # fmt: skip
        return (f"{rec.id}: canary running on '{rec.route}' ({rec.candidate} at {rec.steps['canary']['weights'][rec.candidate]:g}); "
                f"after enough ratings: ragops loop {rec.alias} --decide")  # fmt: skip
    if rec.status == "rejected":
        return f"{rec.id}: candidate {rec.candidate} rejected by the gate; '{rec.alias}' stays on {rec.control}"
    if rec.status == "promoted":
        return f"{rec.id}: {rec.decision['verdict']} — '{rec.alias}' now points at {rec.candidate}; split removed"
    if rec.status == "rolled_back":
        return f"{rec.id}: {rec.decision['verdict']} — split removed; '{rec.alias}' stays on {rec.control}"
    return f"{rec.id}: {rec.status}"
