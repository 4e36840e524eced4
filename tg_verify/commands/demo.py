"""`tg-verify demo [--dir CACHE]`: the embedded first run: two policies on tiny models built offline.

Exit 0 when the fine-tune passes and the unrelated model fails, as they must; 1 otherwise.
"""

from __future__ import annotations

import argparse
from pathlib import Path

VERB = "demo"
ORDER = 90


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the `demo` parser."""
    parser = subparsers.add_parser(
        VERB, help="see tg-verify work in under a minute: no network, no model needed",
        description=("Build (once, into a cache directory) a tiny base model, a fine-tune of it and an unrelated "
                     "model of the same shape, fingerprint the references, then run a policy that must PASS "
                     "(the fine-tune declares its base) and one that must FAIL (the unrelated model claims the "
                     "same base). The policies are left in the cache directory to read and adapt."),
        epilog="Exit codes: 0 both verdicts as expected, 1 otherwise, 2 bad input, 3 internal error.")
    parser.add_argument("--dir", metavar="CACHE", help="where to build and keep the demo "
                                                       "(default ~/.cache/tg-verify/demo)")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the models even if they are cached")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bars (default: on a terminal outside CI)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Build or reuse the demo, run both policies, show both verdicts."""
    import shutil
    import time

    from rich.rule import Rule

    from tg_verify import demo
    from tg_verify.progress import progress_sink, wants_progress
    from tg_verify.report import console as console_report

    out = console_report.make_console()
    directory = Path(args.dir) if args.dir else demo.default_demo_dir()
    if args.rebuild and (directory / demo.DEMO_VERSION).exists():
        shutil.rmtree(directory / demo.DEMO_VERSION)
    start = time.perf_counter()

    def log(message: str) -> None:
        out.print(f"demo: {message}", style="dim", markup=False)

    with progress_sink(wants_progress(args.progress)) as sink:
        tree, built = demo.ensure(directory, sink, log=log)
        log(f"{'built' if built else 'reusing'} models, references and policies in {tree}")
        runs = demo.run(directory, sink)
    for number, item in enumerate(runs, start=1):
        expected = "PASS" if item.case.expect_pass else "FAIL"
        out.print(Rule(f"[bold]{number}. {item.case.name}[/] (expected {expected})"))
        out.print(f"{item.case.story}\npolicy: {item.case.policy}", style="dim", markup=False)
        console_report.render(item.result, out)
        note = demo.attribution_note(item)
        if note:
            out.print(note, style="yellow", markup=False)
    ok = all(item.as_expected for item in runs)
    out.print(Rule())
    verdicts = ", ".join(f"{item.case.name}: {item.result.verdict.label.upper()}" for item in runs)
    if ok:
        out.print(f"[bold green]demo: both verdicts as expected[/] ({verdicts}; {time.perf_counter() - start:.1f} s)")
        out.print(f"next: read {tree / 'policies' / 'pass.yml'}, then docs/policy.md to write your own policy",
                  markup=False)
    else:
        out.print(f"[bold red]demo: unexpected verdict[/] ({verdicts})")
    return 0 if ok else 1
