"""The ``r3l`` command: ``fit`` and ``evaluate`` (LightningCLI, :mod:`r3l_lightning.cli`), and two tools
for a finished or running run that load neither torch nor Lightning:

    r3l view runs/countdown-r3l      # the rollout viewer: one self-contained HTML file
    r3l report runs/countdown-r3l    # key figures, and curves.png next to the CSV metrics
"""

from __future__ import annotations

import argparse
import sys

TOOLS = ("view", "report")
COMMANDS = {  # the one-line help of every subcommand, as `r3l --help` lists them
    "fit": "train: exploration, training and evaluation (r3l fit --config configs/countdown/r3l.yaml)",
    "evaluate": "evaluate a model or checkpoint on the eval tasks without training",
    "view": "write the rollout viewer: one self-contained HTML file",
    "report": "print the key figures and write curves.png from the CSV metrics",
}


def overview() -> str:
    """``r3l --help``: every subcommand, training and tools alike."""
    lines = [f"usage: r3l {{{','.join(COMMANDS)}}} ...", "", "R³L (Reflect-then-Retry RL) for LLM agents.", "",
             "subcommands:"]
    lines += [f"  {name:<10}{text}" for name, text in COMMANDS.items()]
    lines += ["", "`r3l <subcommand> --help` shows the options of each."]
    return "\n".join(lines)


def run_tool(args: list[str]) -> None:
    """``r3l view RUN_DIR [-o FILE]`` and ``r3l report RUN_DIR [-o FILE]``."""
    parser = argparse.ArgumentParser(prog="r3l", description="Tools for a finished or running r3l run "
                                     "(training: r3l fit / r3l evaluate).")
    tools = parser.add_subparsers(dest="tool", required=True)
    view = tools.add_parser("view", help=COMMANDS["view"])
    view.add_argument("run_dir", help="a run directory (runs/<job>), a log directory holding rollouts/, or that "
                      "rollouts/ folder")
    view.add_argument("-o", "--out", help="output file (default <log_dir>/rollouts.html)")
    rep = tools.add_parser("report", help=COMMANDS["report"])
    rep.add_argument("run_dir", help="a run directory (runs/<job>), a log directory or a metrics.csv")
    rep.add_argument("-o", "--out", help="output PNG (default curves.png next to metrics.csv)")
    rep.add_argument("--x", choices=("epoch", "step", "tokens"), default="epoch",
                     help="x axis of curves.png: epochs trained, optimizer steps or rollout tokens (default epoch)")
    options = parser.parse_args(args)
    try:
        if options.tool == "view":
            from r3l_lightning.viewer import write_viewer

            path, groups = write_viewer(options.run_dir, options.out)
            print(f"wrote {path} ({groups} groups, {path.stat().st_size / 2**20:.2f} MiB): open it in a browser")
        else:
            from r3l_lightning.report import report

            text, png = report(options.run_dir, options.out, options.x)
            print(f"{text}\ncurves: {png}")
    except FileNotFoundError as err:
        parser.exit(2, f"r3l {options.tool}: {err}\n")


def main() -> None:
    if sys.argv[1:] in ([], ["-h"], ["--help"]):
        print(overview())
        sys.exit(0 if sys.argv[1:] else 2)
    if sys.argv[1] in TOOLS:
        run_tool(sys.argv[1:])
    else:
        from r3l_lightning.cli import main as lightning_main

        lightning_main()


if __name__ == "__main__":
    main()
