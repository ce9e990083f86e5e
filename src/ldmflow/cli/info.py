"""The commands that report rather than compute: ``status`` (every experiment of the workflow) and ``schemas``."""

from __future__ import annotations

from pathlib import Path

from ldmflow.cli.arguments import add_command, output_dir


def cmd_status(args) -> None:
    import time

    from rich.console import Console

    from ldmflow.status import as_json, render, workflow_status

    console = Console()
    if not console.is_terminal:  # a pipe or a file: whole rows, no wrapping at 80 columns
        console = Console(width=160)
    try:
        while True:
            rows = workflow_status(args.config, args.results)
            if args.json:
                import json

                print(json.dumps(as_json(rows), indent=1), flush=True)
            else:
                title = f"{args.results}  {time.strftime('%Y-%m-%d %H:%M:%S')}"
                if args.watch:
                    title += f"  (every {args.watch:g} s; Ctrl-C stops)"
                    if console.is_terminal:
                        console.clear()
                console.print(render(rows, title=title))
            if not args.watch:
                return
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return


def cmd_schemas(args) -> None:
    from ldmflow.config.loading import schema_documents, schema_tables

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # the JSON for editors and validation, the Markdown tables beside it for the docs' configuration reference
    for name, text in {**schema_documents(), **schema_tables()}.items():
        (out / name).write_text(text)
        print(out / name)


def add_commands(sub) -> None:
    p = add_command(sub, "status", cmd_status, "one table of every experiment of the workflow: state, epoch, best, ETA")
    p.add_argument("--results", default="results", help="the workflow's results folder (default results)")
    p.add_argument("--config", default="config/config.yaml", help="workflow config (default config/config.yaml)")
    p.add_argument("--watch", type=float, default=None, metavar="SECONDS", help="refresh every SECONDS")
    p.add_argument("--json", action="store_true", help="print JSON (one object per experiment) for scripts")

    p = add_command(sub, "schemas", cmd_schemas,
                    "write the JSON schemas of the experiment files (for editors), and their Markdown tables (docs)")
    p.add_argument("--out", type=output_dir, default="config/schemas", help="output folder (default config/schemas)")
