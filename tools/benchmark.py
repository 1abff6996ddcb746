#!/usr/bin/env python
"""Benchmark a config against detectron2's built-in model; see mrcnn_plugin/cli/benchmark.py."""

from mrcnn_plugin.cli.benchmark import main

if __name__ == "__main__":
    main()
