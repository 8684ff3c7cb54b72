"""The ``tessera`` command: generate, chat, serve, router, convert, eval, recommend, info, bench."""

from __future__ import annotations

import argparse
import json
import sys

from .args import EngineArgs, parse_size

EXIT_BAD_INPUT = 2


def _progress_bar(desc: str):
    """A progress callback drawing a tqdm bar on stderr (silent when stderr isn't a terminal)."""
    from tqdm import tqdm

    bar = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=desc, unit="tensor", leave=False, disable=None, file=sys.stderr)
        bar.update(done - bar.n)
        if done >= total:  # the next load (a draft model's) draws a bar of its own
            bar.close()
            bar = None

    return update


def _build_llm(ns: argparse.Namespace):
    from .llm import LLM

    args = EngineArgs.from_cli(ns)
    kwargs = {k: v for k, v in vars(args).items() if k != "model"}
    return LLM(args.model, progress=_progress_bar("loading weights"), **kwargs)


def _sampling_params(ns: argparse.Namespace):
    from tessera.sampling import SamplingParams

    return SamplingParams(
        temperature=ns.temperature,
        top_p=ns.top_p,
        top_k=ns.top_k,
        seed=ns.seed,
        max_tokens=ns.max_tokens,
    )


def _add_sampling_args(p: argparse.ArgumentParser, default_temperature: float) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument(
        "--max-tokens", type=int, default=128, help="tokens to generate at most (default: %(default)s)"
    )
    g.add_argument(
        "--temperature", type=float, default=default_temperature, help="0 is greedy (default: %(default)s)"
    )
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")


def cmd_generate(ns: argparse.Namespace) -> int:
    if ns.prompts_file:
        try:
            with open(ns.prompts_file, encoding="utf-8") as f:
                lines = [ln for ln in f.read().splitlines() if ln.strip()]
        except OSError as e:
            raise ValueError(f"{ns.prompts_file}: cannot read ({e.strerror})") from e
        prompts = []
        for n, line in enumerate(lines, 1):
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{ns.prompts_file}:{n}: not a JSON string ({e.msg})") from e
            if not isinstance(value, str):
                raise ValueError(f"{ns.prompts_file}:{n}: expected a JSON string, got {type(value).__name__}")
            prompts.append(value)
        if ns.prompt is not None:
            prompts.insert(0, ns.prompt)
    elif ns.prompt is not None:
        prompts = [ns.prompt]
    else:
        raise ValueError("give a PROMPT or --prompts-file FILE")
    params = _sampling_params(ns)
    llm = _build_llm(ns)
    outputs = llm.generate(prompts, params)
    for out in outputs:
        if ns.json:
            print(
                json.dumps(
                    {
                        "text": out.text,
                        "token_ids": out.token_ids,
                        "finish_reason": out.finish_reason,
                        "prompt_tokens": len(out.prompt_token_ids),
                        "completion_tokens": len(out.token_ids),
                    },
                    ensure_ascii=False,
                )
            )
        else:
            print(out.text if len(outputs) == 1 else f"--- {out.prompt!r}\n{out.text}")
    return 0


def cmd_chat(ns: argparse.Namespace) -> int:
    llm = _build_llm(ns)
    params = _sampling_params(ns)
    messages: list[dict] = []
    if ns.system:
        messages.append({"role": "system", "content": ns.system})
    interactive = sys.stdin.isatty()
    if interactive:
        print("Chatting with", ns.model, "- an empty line or Ctrl-D ends.", file=sys.stderr)
    while True:
        if interactive:
            print("> ", end="", flush=True, file=sys.stderr)
        line = sys.stdin.readline()
        if not line or not line.strip():
            return 0
        messages.append({"role": "user", "content": line.rstrip("\n")})
        ids = llm.tokenizer.encode_chat(messages)
        reply = ""
        try:
            for out in llm.stream(ids, params):
                print(out.delta_text, end="", flush=True)
                reply = out.text
        except KeyboardInterrupt:
            pass
        print()
        messages.append({"role": "assistant", "content": reply})


def cmd_serve(ns: argparse.Namespace) -> int:
    from .async_llm import AsyncLLM
    from .server import ServerLimits, build_app, serve

    limits = ServerLimits(
        max_request_body_size=ns.max_request_body_size,
        max_n=ns.max_n,
        max_waiting_requests=ns.max_waiting_requests,
        shutdown_timeout=ns.shutdown_timeout,
    )
    for name, value in (("--max-n", limits.max_n), ("--max-waiting-requests", limits.max_waiting_requests)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if limits.shutdown_timeout < 0:
        raise ValueError(f"--shutdown-timeout must be >= 0, got {limits.shutdown_timeout}")

    if ns.model_positional:
        ns.model = ns.model_positional
    llm = _build_llm(ns)
    url = f"http://{ns.host}:{ns.port}"

    def ready() -> None:
        print(f"tessera: serving {ns.model} at {url}/v1 (health: {url}/health)", file=sys.stderr, flush=True)

    app = build_app(
        AsyncLLM(llm),
        ns.served_model_name or ns.model,
        ns.api_key,
        on_ready=ready,
        limits=limits,
        tool_call_parser=ns.tool_call_parser,
        enable_auto_tool_choice=ns.enable_auto_tool_choice,
    )
    serve(app, ns.host, ns.port, ns.log_level)
    return 0


def cmd_convert(ns: argparse.Namespace) -> int:
    from pathlib import Path

    from tessera.formats.calibration import default_text

    from .convert import Calibration, GPTQTarget, convert
    from .model_source import resolve_model

    head_flags = ns.lm_head or ns.lm_head_bits is not None or ns.lm_head_group_size is not None
    if ns.to == "exl2":
        from . import convert_exl2_cli

        if head_flags:
            raise ValueError(
                "--lm-head, --lm-head-bits and --lm-head-group-size are GPTQ's; EXL2 takes --head-bits"
            )
        return convert_exl2_cli.run(ns)
    if ns.to != "gptq":
        raise ValueError(f"--to {ns.to!r} is not a format tessera converts to (supported: gptq, exl2)")
    if ns.head_bits is not None:
        raise ValueError(
            "--head-bits is EXL2's; GPTQ quantizes the LM head with --lm-head [--lm-head-bits N]"
        )
    head_bits = (8 if ns.lm_head_bits is None else ns.lm_head_bits) if head_flags else None
    target = GPTQTarget(
        ns.bits, ns.group_size, ns.sym, ns.act_order, ns.damp, lm_head_bits=head_bits,
        lm_head_group_size=32 if ns.lm_head_group_size is None else ns.lm_head_group_size,
    )  # fmt: skip
    cal = Calibration(Path(ns.calibration) if ns.calibration else default_text(), ns.rows, ns.row_length)
    report = convert(resolve_model(ns.src), Path(ns.dst), target, cal, force=ns.force, resume=ns.resume)
    errors = sorted(report.errors.values())
    summary = {
        "destination": ns.dst,
        "layers": report.layers,
        "resumed_at_layer": report.resumed_at,
        "seconds": round(report.seconds, 1),
        "linears": len(errors),
        "median_relative_output_error": errors[len(errors) // 2] if errors else None,
        "max_relative_output_error": errors[-1] if errors else None,
        "lm_head_relative_output_error": report.errors.get("lm_head"),
    }
    print(json.dumps(summary))
    return 0


def _add_convert_parser(sub) -> None:
    conv = sub.add_parser(
        "convert",
        help="quantize a model with calibration text (GPTQ) into a new checkpoint folder",
        description="Quantize SRC (a model name, .gguf file or HF folder; GPTQ/AWQ sources are "
        "dequantized first) layer by layer on calibration text into the HF GPTQ layout at DST. An "
        "interrupted run resumes from its state folder beside DST.",
    )
    conv.add_argument("src", metavar="SRC")
    conv.add_argument("dst", metavar="DST")
    conv.add_argument("--to", required=True, help="target format: gptq or exl2")
    conv.add_argument("--bits", type=int, default=4, help="2, 3, 4 or 8 (default: %(default)s)")
    conv.add_argument("--group-size", type=int, default=128, help="inputs per group, -1: one per row")
    conv.add_argument("--act-order", action="store_true", help="quantize inputs by descending activation")
    conv.add_argument("--sym", action="store_true", help="symmetric (zero at the middle code; GPTQ v1)")
    conv.add_argument("--damp", type=float, default=0.01, help="Hessian damping (default: %(default)s)")
    conv.add_argument(
        "--lm-head", action="store_true",
        help="quantize the LM head too (GPTQModel's lm_head=True; a tied head becomes its own weight): "
        "symmetric, no act-order, --lm-head-bits in groups of --lm-head-group-size",
    )  # fmt: skip
    conv.add_argument("--lm-head-bits", type=int, help="the LM head's bits, implies --lm-head (default: 8)")
    conv.add_argument(
        "--lm-head-group-size",
        type=int,
        help="the LM head's inputs per group, implies --lm-head (default: 32)",
    )
    conv.add_argument(
        "--calibration", metavar="FILE", help="calibration text (default: ../shared/data/wiki.utf8)"
    )
    conv.add_argument("--rows", type=int, default=128, help="calibration rows (default: %(default)s)")
    conv.add_argument("--row-length", type=int, default=512, help="tokens per row (default: %(default)s)")
    conv.add_argument("--force", action="store_true", help="replace DST if it exists")
    conv.add_argument("--resume", action="store_true", help="require a matching state to continue")
    from . import convert_exl2_cli

    convert_exl2_cli.add_args(conv)
    conv.set_defaults(func=cmd_convert)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tessera", description="Run language models.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="complete one prompt, or a file of prompts as one batch")
    gen.add_argument("prompt", nargs="?", default=None, help="the text to continue")
    gen.add_argument("--prompts-file", metavar="FILE", help="one JSON string per line, run together")
    gen.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    EngineArgs.add_cli_args(gen)
    _add_sampling_args(gen, default_temperature=0.0)
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="an interactive chat using the model's chat template")
    chat.add_argument("--system", default=None, help="a system message")
    EngineArgs.add_cli_args(chat)
    _add_sampling_args(chat, default_temperature=0.7)
    chat.set_defaults(func=cmd_chat)

    serve = sub.add_parser("serve", help="the OpenAI-compatible HTTP server")
    serve.add_argument(
        "model_positional",
        nargs="?",
        default=None,
        metavar="MODEL",
        help="same as --model (default: smollm2-135m-instruct)",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY on /v1 routes")
    serve.add_argument(
        "--served-model-name", default=None, help="the model name clients use (default: MODEL)"
    )
    serve.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    from .server import ServerLimits

    d = ServerLimits()
    lim = serve.add_argument_group("limits")
    lim.add_argument(
        "--max-request-body-size",
        type=parse_size,
        default=d.max_request_body_size,
        metavar="SIZE",
        help="larger bodies get a 413 as soon as they pass it (default: 32MiB)",
    )
    lim.add_argument(
        "--max-n", type=int, default=d.max_n, help="choices per prompt at most (default: %(default)s)"
    )
    lim.add_argument(
        "--max-waiting-requests",
        type=int,
        default=d.max_waiting_requests,
        help="sequences queued before a 503 with Retry-After (default: %(default)s)",
    )
    lim.add_argument(
        "--shutdown-timeout",
        type=float,
        default=d.shutdown_timeout,
        metavar="SECONDS",
        help="on SIGTERM, how long running requests may finish before they are aborted "
        "(default: %(default)s)",
    )
    from .server.tool_parsers import TOOL_PARSERS

    tools = serve.add_argument_group("tool calling")
    tools.add_argument(
        "--tool-call-parser",
        default="auto",
        choices=["auto", *sorted(TOOL_PARSERS)],
        help="how tool calls are read out of the model's text for tool_choice auto; auto: from the chat "
        "template (llama3_json for Llama 3's, else hermes) (default: %(default)s)",
    )
    tools.add_argument(
        "--enable-auto-tool-choice",
        action=argparse.BooleanOptionalAction,
        default=True,
        help='let the model decide whether to call a tool (tool_choice "auto", the default when tools are '
        "given); --no-enable-auto-tool-choice refuses it with a 400 (default: on)",
    )
    EngineArgs.add_cli_args(serve)
    serve.set_defaults(func=cmd_serve)

    from . import router

    rt = sub.add_parser(
        "router",
        help="disaggregated serving: each request's prompt to a prefill server, the rest to a decode server",
        description=router.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    router.add_args(rt)
    rt.set_defaults(func=router.run)

    _add_convert_parser(sub)
    from . import bench_serve, info

    inf = sub.add_parser("info", help="platform, kernel backend and what runs each op, supported models")
    info.add_args(inf)
    inf.set_defaults(func=info.run)

    from . import recommend_cli

    rec = sub.add_parser(
        "recommend", help="which quantized variant fits a device: memory, context, decode speed, quality"
    )
    recommend_cli.add_args(rec)
    rec.set_defaults(func=recommend_cli.run)

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    bs = bench_sub.add_parser("serve", help="TTFT, inter-token latency and throughput of a running server")
    bench_serve.add_args(bs)
    bs.set_defaults(func=bench_serve.run)
    from . import bench_offline

    bl = bench_sub.add_parser("latency", help="prefill tokens/s, time to first token, single-stream decode")
    bench_offline.add_latency_args(bl)
    bl.set_defaults(func=bench_offline.run_latency)
    bt = bench_sub.add_parser("throughput", help="aggregate output tokens/s at several concurrencies")
    bench_offline.add_throughput_args(bt)
    bt.set_defaults(func=bench_offline.run_throughput)
    from . import evaluate

    ev = sub.add_parser(
        "eval",
        help="quantization quality on held-out text: perplexity, KL and top-1 against a baseline, "
        "last-word accuracy, bits per weight",
        description=evaluate.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    evaluate.add_args(ev)
    ev.set_defaults(func=evaluate.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    ns.argv = list(sys.argv[1:] if argv is None else argv)  # the command as given, for reports
    from tessera.formats import FormatError

    try:
        return ns.func(ns)
    except (FormatError, ValueError) as e:
        print(f"tessera: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
