"""`ragtune`: ingest, ask, fine-tune and manage adapters through the gateway; `ragtune up` runs it all locally."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import grpc

from clients.cli.client import DEFAULT_GATEWAY, GatewayClient, describe_error, resolve_api_key
from clients.cli.operations import ask, ingest, iter_documents, upload_dataset, watch_job
from clients.cli.quotas import add_quota_commands
from ragtune.tls import TLSConfigError
from ragtune.v1 import gateway_pb2, generator_pb2, trainer_pb2



def _client(args) -> GatewayClient:
    return GatewayClient(args.gateway, resolve_api_key(args.api_key), tls=args.tls, ca=args.ca, cert=args.cert,
                         key=args.key, server_name=args.server_name)


def _cmd_ingest(args) -> int:
    client = _client(args)
    docs = list(iter_documents(args.paths))
    if not docs:
        print("no documents found (.txt, .md, .rst files, or .jsonl of {id, text, metadata})", file=sys.stderr)
        return 2
    totals = ingest(client, args.collection, docs)
    print(f"{totals['upserted']} documents written ({totals['chunks']} chunks), {totals['unchanged']} unchanged")
    return 0


def _cmd_ask(args) -> int:
    client = _client(args)
    if args.no_stream:
        q = gateway_pb2.AskQuestion(question=args.question, collection=args.collection, adapter=args.adapter or "",
                                    top_k=args.top_k, no_retrieval=args.no_retrieval)
        reply = client.call("Ask", gateway_pb2.AskRequest(question=q))
        print(reply.answer)
        for c in reply.citations:
            print(f"  [{c.number}] {c.document_id} chunk {c.chunk_index} score {c.score:.3f}")
        return 0
    ask(client, args.question, collection=args.collection, adapter=args.adapter or "", top_k=args.top_k,
        no_retrieval=args.no_retrieval)
    return 0


def _job_spec(args) -> trainer_pb2.JobSpec:
    spec = trainer_pb2.JobSpec(adapter_name=args.name, dataset=args.dataset_name or Path(args.dataset).stem,
                               method=trainer_pb2.TrainingMethod.Value(f"TRAINING_METHOD_{args.method.upper()}"))
    hp = spec.hyperparameters
    hp.epochs, hp.max_steps, hp.batch_size, hp.max_seq_len = args.epochs, args.max_steps, args.batch_size, args.max_seq_len
    if args.learning_rate:
        hp.learning_rate = args.learning_rate
    if args.rank:
        spec.lora.r = args.rank
    return spec


def _cmd_finetune(args) -> int:
    client = _client(args)
    if args.action == "create":
        spec = _job_spec(args)
        if args.gate:
            if not args.promote:
                print("error: --gate needs --promote ALIAS (the alias to challenge)", file=sys.stderr)
                return 2
            spec.gate.CopyFrom(trainer_pb2.PromotionGate(
                eval_set=Path(args.gate).read_bytes(), collection=args.gate_collection, alias=args.promote,
                margin=args.margin, metric=trainer_pb2.GateMetric.Value(f"GATE_METRIC_{args.gate_metric.upper()}")))
        uploaded = upload_dataset(client, Path(args.dataset), spec.dataset)
        print(f"uploaded {uploaded.name}: {uploaded.lines} lines, sha256 {uploaded.sha256[:12]}")
        job = client.call("CreateJob", gateway_pb2.GatewayServiceCreateJobRequest(
            request=trainer_pb2.CreateJobRequest(spec=spec))).response.job
        print(f"job {job.id} {trainer_pb2.JobState.Name(job.state)}")
        if args.watch:
            job = watch_job(client, job.id)
            _print_job(job)
            if job.gate_verdict.evaluation_id:
                _write_gate_report(client, job.gate_verdict.evaluation_id, Path(args.gate_report))
        return 0
    if args.action == "watch":
        _print_job(watch_job(client, args.job_id))
        return 0
    if args.action == "list":
        jobs = client.call("ListJobs", gateway_pb2.GatewayServiceListJobsRequest(
            request=trainer_pb2.ListJobsRequest())).response.jobs
        for job in jobs:
            print(f"{job.id}  {trainer_pb2.JobState.Name(job.state)[10:]:<10} {job.spec.adapter_name:<24} "
                  f"step {job.step}/{job.total_steps}  {job.adapter_path}")
        return 0
    job = client.call("CancelJob", gateway_pb2.GatewayServiceCancelJobRequest(
        request=trainer_pb2.CancelJobRequest(id=args.job_id))).response.job
    _print_job(job)
    return 0


def _write_gate_report(client, evaluation_id: str, folder: Path) -> None:
    reply = client.call("GetEvaluation", gateway_pb2.GetEvaluationRequest(id=evaluation_id, include_report=True))
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in (("report.md", reply.report_markdown), ("report.html", reply.report_html),
                       ("results.json", reply.results_json)):
        (folder / name).write_text(text, encoding="utf-8")
    print(f"  the gate's report: {folder / 'report.html'}")


def _print_job(job: trainer_pb2.Job) -> None:
    line = f"job {job.id}: {trainer_pb2.JobState.Name(job.state)}"
    if job.adapter_path:
        line += f" -> adapter {job.adapter_path}"
    if job.error:
        line += f" ({job.error})"
    print(line)
    if job.HasField("gate_verdict"):
        v = job.gate_verdict
        print(f"gate {'PROMOTED' if v.promoted else 'HELD BACK'}: {v.reason}")
        print(f"  evaluation {v.evaluation_id}")
    for problem in job.dataset_problems:
        print(f"  line {problem.line}: {problem.field} {problem.message}")


def _cmd_adapters(args) -> int:
    client = _client(args)
    if args.action == "list":
        for a in client.call("ListAdapters", gateway_pb2.GatewayServiceListAdaptersRequest(
                request=trainer_pb2.ListAdaptersRequest())).response.adapters:
            method = trainer_pb2.TrainingMethod.Name(a.method)[16:].lower()
            print(f"{a.name}/{a.version}  {method:<14} servable={a.servable}  base={a.base_model}")
        loaded = client.call("ListLoadedAdapters", gateway_pb2.GatewayServiceListLoadedAdaptersRequest(
            request=generator_pb2.GeneratorServiceListAdaptersRequest())).response.adapters
        print("loaded in the generator: " + (", ".join(a.name for a in loaded) or "none"))
    elif args.action == "load":
        a = client.call("LoadAdapter", gateway_pb2.GatewayServiceLoadAdapterRequest(
            request=generator_pb2.LoadAdapterRequest(name=args.name))).response.adapter
        print(f"loaded {a.name} (rank {a.rank})")
    elif args.action == "alias":
        return _alias(client, args)
    else:
        client.call("UnloadAdapter", gateway_pb2.GatewayServiceUnloadAdapterRequest(
            request=generator_pb2.UnloadAdapterRequest(name=args.name)))
        print(f"unloaded {args.name}")
    return 0


def _targets(alias: trainer_pb2.AdapterAlias | None, targets=None) -> str:
    targets = alias.targets if alias is not None else targets
    if len(targets) == 1:
        return f"version {targets[0].version}"
    return " / ".join(f"version {t.version} ({t.weight}%)" for t in targets)


def _alias(client, args) -> int:
    adapter, _, alias = args.ref.partition("@")
    if not alias:
        print("error: name the alias as <adapter>@<alias>, e.g. my-style@prod", file=sys.stderr)
        return 2
    if args.alias_action == "set":
        targets = []
        for part in args.targets:
            version, _, weight = part.partition(":")
            targets.append(trainer_pb2.AliasTarget(version=int(version), weight=int(weight or 100)))
        moved = client.call("SetAdapterAlias", gateway_pb2.GatewayServiceSetAdapterAliasRequest(
            request=trainer_pb2.SetAdapterAliasRequest(adapter=adapter, alias=alias, targets=targets,
                                                       reason=args.reason))).response.alias
        print(f"{adapter}@{alias} -> {_targets(moved)} (revision {moved.revision})")
    elif args.alias_action == "rollback":
        moved = client.call("RollbackAdapterAlias", gateway_pb2.GatewayServiceRollbackAdapterAliasRequest(
            request=trainer_pb2.RollbackAdapterAliasRequest(adapter=adapter, alias=alias,
                                                            reason=args.reason))).response.alias
        print(f"{adapter}@{alias} rolled back -> {_targets(moved)} (revision {moved.revision})")
    else:
        reply = client.call("GetAdapterAlias", gateway_pb2.GatewayServiceGetAdapterAliasRequest(
            request=trainer_pb2.GetAdapterAliasRequest(adapter=adapter, alias=alias))).response
        print(f"{adapter}@{alias} -> {_targets(reply.alias)} (revision {reply.alias.revision})")
        for e in reply.history:
            when = e.time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S")
            before = _targets(None, e.from_targets) if e.from_targets else "nothing"
            print(f"  {when}  {e.action:<8} {e.actor:<24} {before} -> {_targets(None, e.to_targets)}  {e.reason}")
    return 0


def _cmd_keys(args) -> int:
    if args.action == "create" and args.file:
        return _bootstrap_key(args)
    if args.action == "create" and args.tenant:
        print("error: --tenant goes with --file; through the gateway a key is made for the caller's own tenant",
              file=sys.stderr)
        return 2
    client = _client(args)
    if args.action == "create":
        reply = client.call("CreateApiKey", gateway_pb2.CreateApiKeyRequest(
            scopes=args.scopes.split(","), name=args.name))
        k = reply.api_key
        print(f"created {k.id} for tenant {k.tenant} ({','.join(k.scopes)}); the key is shown only now:\n{reply.key}")
    elif args.action == "list":
        keys = client.call("ListApiKeys", gateway_pb2.ListApiKeysRequest(include_revoked=args.all)).api_keys
        for k in keys:
            state = "revoked" if k.revoke_time else "active"
            print(f"{k.id}  {state:<8} {','.join(k.scopes):<24} {k.source:<5} {k.prefix or '-':<9} {k.name}")
        if not keys:
            print("no API keys")
    else:
        if not args.id:
            print("error: name the key to revoke (an id from `ragtune keys list`)", file=sys.stderr)
            return 2
        k = client.call("RevokeApiKey", gateway_pb2.RevokeApiKeyRequest(id=args.id)).api_key
        print(f"revoked {k.id}: every gateway refuses it within seconds")
    return 0


def _bootstrap_key(args) -> int:
    """Offline: appends a hashed key to a keys file, which gateways import at start."""
    from ragtune.controlplane.api_keys import new_key_entry

    if not args.tenant:
        print("error: --file needs --tenant", file=sys.stderr)
        return 2
    key, entry = new_key_entry(args.tenant, args.scopes.split(","))
    path = Path(args.file)
    data = json.loads(path.read_text()) if path.exists() else {"keys": []}
    data["keys"].append(entry)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
    os.chmod(path, 0o600)
    print(f"added a key for tenant {args.tenant} ({args.scopes}) to {path}; it is shown only now:\n{key}")
    return 0


def _cmd_eval(args) -> int:
    from clients.cli.evaluate import print_summary, run_evaluation

    spec = gateway_pb2.EvaluationSpec(eval_set=Path(args.eval_set).read_bytes(), collection=args.collection,
                                      adapter=args.adapter, top_k=args.top_k)
    for arm in args.arms or []:
        spec.arms.append(gateway_pb2.EvaluationArm.Value(f"EVALUATION_ARM_{arm.upper()}"))
    spec.constraints.data_change = args.data_change
    if args.latency_budget_ms:
        spec.constraints.latency_budget_ms = args.latency_budget_ms
    if args.cost_budget_tokens:
        spec.constraints.cost_budget_tokens = args.cost_budget_tokens
    if args.max_tokens:
        spec.sampling.max_tokens = args.max_tokens
    reply = run_evaluation(_client(args), spec, Path(args.out))
    print_summary(reply, Path(args.out))
    return 0 if reply.evaluation.state == gateway_pb2.EVALUATION_STATE_SUCCEEDED else 1


def _cmd_up(args) -> int:
    from clients.launcher import run_up

    return run_up(demo=args.demo, exit_after=args.exit)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ragtune", description=__doc__)
    parser.add_argument("--gateway", default=os.environ.get("RAGTUNE_GATEWAY_URL", DEFAULT_GATEWAY),
                        help="gateway host:port (env RAGTUNE_GATEWAY_URL)")
    parser.add_argument("--api-key", default=None, help="API key (env RAGTUNE_API_KEY; default the local dev key)")
    tls = parser.add_argument_group("TLS (each defaults to the environment variable named)")
    tls.add_argument("--tls", action="store_true", help="connect over TLS, trusting --ca or gRPC's default roots"
                     " (env RAGTUNE_TLS=1)")
    tls.add_argument("--ca", metavar="PATH", help="CA certificate (PEM) the gateway's certificate is signed by;"
                     " implies --tls (env RAGTUNE_TLS_CA_FILE)")
    tls.add_argument("--cert", metavar="PATH", help="client certificate (PEM) for a gateway that requires one;"
                     " implies --tls (env RAGTUNE_TLS_CLIENT_CERT_FILE)")
    tls.add_argument("--key", metavar="PATH", help="the key of --cert (env RAGTUNE_TLS_CLIENT_KEY_FILE)")
    tls.add_argument("--server-name", metavar="NAME", help="name to verify in the gateway's certificate instead"
                     " of the host of --gateway (env RAGTUNE_TLS_SERVER_NAME_OVERRIDE)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("up", help="start the four services locally and wait until they serve")
    p.add_argument("--demo", action="store_true", help="then ingest, ask, fine-tune and ask again")
    p.add_argument("--exit", action="store_true", help="stop the services after the demo instead of serving on")
    p.set_defaults(func=_cmd_up)

    p = sub.add_parser("ingest", help="ingest text files, folders or JSONL into a collection")
    p.add_argument("paths", nargs="+")
    p.add_argument("--collection", "-c", default="docs")
    p.set_defaults(func=_cmd_ingest)

    p = sub.add_parser("ask", help="ask a question (streams the answer with its citations)")
    p.add_argument("question")
    p.add_argument("--collection", "-c", default="docs")
    p.add_argument("--adapter", "-a", default="")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--no-retrieval", action="store_true", help="plain generation, no context")
    p.add_argument("--no-stream", action="store_true")
    p.set_defaults(func=_cmd_ask)

    p = sub.add_parser("finetune", help="fine-tuning jobs")
    fs = p.add_subparsers(dest="action", required=True)
    c = fs.add_parser("create", help="upload a JSONL dataset and start a job")
    c.add_argument("--name", required=True, help="adapter name to register")
    c.add_argument("--dataset", required=True, help="JSONL file (chat, prompt/completion, instruction or preference)")
    c.add_argument("--dataset-name", default="")
    c.add_argument("--method", default="lora", choices=["lora", "selective", "ia3", "prompt_tuning", "dpo"])
    c.add_argument("--epochs", type=int, default=1)
    c.add_argument("--max-steps", type=int, default=0)
    c.add_argument("--batch-size", type=int, default=0)
    c.add_argument("--max-seq-len", type=int, default=0)
    c.add_argument("--learning-rate", type=float, default=0.0)
    c.add_argument("--rank", type=int, default=0)
    c.add_argument("--watch", action="store_true", help="follow progress until the job ends")
    c.add_argument("--gate", default="", help="eval set (JSONL): evaluate the new version before promoting it")
    c.add_argument("--promote", default="", help="with --gate: the alias to move when the new version wins")
    c.add_argument("--margin", type=float, default=0.0, help="with --gate: required improvement (lower 95%% bound)")
    c.add_argument("--gate-metric", default="token_f1", choices=["token_f1", "exact_match", "rouge_l",
                                                                  "citation_precision"])
    c.add_argument("--gate-collection", default="", help="with --gate: evaluate with retrieval from this collection")
    c.add_argument("--gate-report", default="gate-report", help="with --gate --watch: folder for the gate's report")
    for action in ("watch", "cancel"):
        fs.add_parser(action).add_argument("job_id")
    fs.add_parser("list")
    p.set_defaults(func=_cmd_finetune)

    p = sub.add_parser("adapters", help="adapters in the registry and the generator")
    as_ = p.add_subparsers(dest="action", required=True)
    as_.add_parser("list")
    for action in ("load", "unload"):
        as_.add_parser(action).add_argument("name", help="<name> or <name>/<version>")
    alias = as_.add_parser("alias", help="aliases (prod, canary, ...): set, show, rollback")
    aa = alias.add_subparsers(dest="alias_action", required=True)
    aset = aa.add_parser("set", help="point an alias at a version, or split it: 3:90 4:10")
    aset.add_argument("ref", help="<adapter>@<alias>")
    aset.add_argument("targets", nargs="+", help="VERSION or VERSION:WEIGHT (two for a canary)")
    aset.add_argument("--reason", default="")
    aa.add_parser("show", help="the alias and its audit trail").add_argument("ref", help="<adapter>@<alias>")
    aroll = aa.add_parser("rollback", help="back to the previous target")
    aroll.add_argument("ref", help="<adapter>@<alias>")
    aroll.add_argument("--reason", default="")
    p.set_defaults(func=_cmd_adapters)

    p = sub.add_parser("eval", help="compare base, RAG, fine-tuned and RAG + fine-tuned on an eval set")
    p.add_argument("--eval-set", required=True, help="JSONL: question, answers (or answer), id?, gold_document_ids?")
    p.add_argument("--collection", "-c", default="")
    p.add_argument("--adapter", "-a", default="")
    p.add_argument("--arms", nargs="*", choices=["base", "rag", "finetuned", "rag_finetuned"])
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=0)
    p.add_argument("--data-change", default="monthly", choices=["static", "monthly", "weekly", "daily", "realtime"])
    p.add_argument("--latency-budget-ms", type=float, default=0.0)
    p.add_argument("--cost-budget-tokens", type=float, default=0.0)
    p.add_argument("--out", default="eval-report", help="folder for report.md and report.html")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("keys", help="create, list or revoke API keys (admin scope; stored hashed)")
    p.add_argument("action", choices=["create", "list", "revoke"])
    p.add_argument("id", nargs="?", help="revoke: the key's id (from `ragtune keys list`)")
    p.add_argument("--scopes", default="read,ingest,train", help="create: comma-separated scopes")
    p.add_argument("--name", default="", help="create: a label for the key")
    p.add_argument("--all", action="store_true", help="list: include revoked keys")
    p.add_argument("--file", help="create: write to this keys file instead (offline bootstrap, imported by gateways"
                                  " at start)")
    p.add_argument("--tenant", help="create --file: the key's tenant")
    p.set_defaults(func=_cmd_keys)

    add_quota_commands(sub, _client)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except grpc.RpcError as exc:
        print(f"error: {describe_error(exc)}", file=sys.stderr)
        return 1
    except TLSConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
