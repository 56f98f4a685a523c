"""Run several commands as their console scripts would, one after another in one Python process (which imports torch
once instead of once per command): ``python -m tests.commands_in_one_process CASES.json RESULTS.json``.

Each case is ``[command, [args...]]``; each result is ``{"returncode", "output"}``, what the command printed to stdout
and stderr together, as ``diffusion-<command> ARGS`` would have printed and exited.
"""

import importlib
import io
import json
import logging
import sys
import traceback

import torch
from hydra.core.global_hydra import GlobalHydra


def run(command: str, args: list[str]) -> dict:
    """``diffusion-<command> ARGS`` in this process: its exit code and its output."""
    buffer = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", write_through=True)
    real = sys.stdout, sys.stderr
    sys.stdout = sys.stderr = buffer
    sys.argv = [f"diffusion-{command}", *args]
    code = 0
    try:
        importlib.import_module(f"diffusion.cli.{command}").main()
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
    except BaseException:  # what the interpreter does with an uncaught exception
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout, sys.stderr = real
        GlobalHydra.instance().clear()
        for handler in logging.root.handlers[:]:
            logging.root.removeHandler(handler)
            handler.close()
        torch.set_grad_enabled(True)  # diffusion-sample turns gradients off for its process
    return {"returncode": code, "output": buffer.buffer.getvalue().decode()}


if __name__ == "__main__":
    cases = json.loads(open(sys.argv[1]).read())
    with open(sys.argv[2], "w") as results:
        json.dump([run(command, args) for command, args in cases], results)
