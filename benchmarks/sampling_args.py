"""The command-line arguments every benchmark that samples the shipped model shares."""

from __future__ import annotations

import argparse


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """--model, --num, --steps, --seed: which model, how many images, DDIM steps (quadratic skip), seed."""
    parser.add_argument("--model", default="fashion-ddpm")
    parser.add_argument("--num", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
