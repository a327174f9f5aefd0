"""The ``dppo`` console script: ``dppo <command> [key=value ...]``."""

from __future__ import annotations

import os
import sys

from dppo.config import CFG_DIR, ConfigError, config_name, load_config

COMMANDS: dict[str, str] = {
    "quickstart": "demos -> pre-training -> DPPO fine-tuning -> evaluation on the default task",
    "demos": "record scripted-expert demonstrations into a zarr dataset",
    "pretrain": "train a diffusion policy by imitation (behaviour cloning)",
    "eval": "roll a checkpoint out in vectorised MuJoCo envs and report success",
    "serve": "serve a checkpoint to robots over WebSocket (protocol: docs/PROTOCOL.md)",
    "robot-sim": "drive a simulated MuJoCo robot through a policy server with the robot client",
    "finetune": "fine-tune a pre-trained policy with DPPO (or the Gaussian-PPO baseline)",
    "train-dynamics": "train DynaGuide's dynamics model on demos: (obs, chunk) -> future obs",
    "collect-play": "record scripted exploratory play data (with success labels) for a world model",
    "train-world-model": "train an RSSM world model + success classifier on play data",
    "finetune-offline": "DPPO fine-tuning inside a learned world model: zero env steps (DiWA)",
}


BENCHES: dict[str, str] = {
    "inference": "samplers' cost (NFE, ms per chunk, overhead ratio) and success",
    "dppo": "DPPO loop throughput: rollout env-steps/s vs raw env, PPO-update samples/s",
    "serve": "policy server latency over loopback and throughput with concurrent clients",
    "guidance": "DynaGuide steering: share of episodes at the chosen goal over strengths",
    "rollout": "DPPO rollout env-steps/s on Ray workers (runner=local|ray) and its overheads",
}
"""``dppo bench <name>`` runs ``commands.bench_<name>`` with ``cfg/bench_<name>.yaml``."""


def usage() -> str:
    lines = ["usage: dppo <command> [key=value ...]", "", "commands:"]
    lines += [f"  {name:<18} {text}" for name, text in COMMANDS.items()]
    lines += ["", "benchmarks (dppo bench <name> [key=value ...]):"]
    lines += [f"  {name:<18} {text}" for name, text in BENCHES.items()]
    lines += ["", "`dppo <command> --help` lists the command's config and its main overrides."]
    return "\n".join(lines)


def command_help(command: str) -> str:
    text = (CFG_DIR / f"{config_name(command)}.yaml").read_text()
    what = COMMANDS.get(command) or BENCHES[command.removeprefix("bench_")]
    return f"dppo {command.replace('_', ' ')}: {what}\n\nconfig (cfg/{config_name(command)}.yaml):\n{text}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("MUJOCO_GL", "egl")
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command, overrides = argv[0], argv[1:]
    if command == "bench":
        if not overrides or overrides[0] not in BENCHES:
            print(f"dppo bench: name one of {', '.join(BENCHES)}", file=sys.stderr)
            return 2
        command, overrides = f"bench_{overrides[0]}", overrides[1:]
    elif command not in COMMANDS:
        print(f"dppo: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    if any(a in ("-h", "--help") for a in overrides):
        print(command_help(command))
        return 0
    from dppo import commands

    try:
        cfg = load_config(command, overrides)
        result = getattr(commands, command.replace("-", "_"))(cfg)
    except (ConfigError, KeyError, ValueError, FileNotFoundError, FileExistsError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"dppo {command}: error: {message}", file=sys.stderr)
        return 2
    commands.print_result(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
