"""Shared fixtures of the Python package's tests (run by ctest as python.package).

The package under test is the one of the build tree: ctest puts <build>/python first on
PYTHONPATH. TENSORMAP_CLI and TENSORMAP_HARNESS name the C++ command line and benchmark
harness of the same build, the C++ side of the round trips.
"""
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import tensormap


def pytest_report_header(config):
    return (f"tensormap from {os.path.dirname(tensormap.__file__)}, torch {torch.__version__}, "
            f"CLI {os.environ.get('TENSORMAP_CLI', '(none)')}")


def built(variable, what):
    path = os.environ.get(variable)
    if not path or not os.path.exists(path):
        pytest.skip(f"{variable} does not name the built {what}")
    return path


@pytest.fixture
def cli():
    return built("TENSORMAP_CLI", "command line")


@pytest.fixture
def harness():
    return built("TENSORMAP_HARNESS", "benchmark harness (TENSORMAP_BUILD_BENCH=OFF?)")


def run(*args):
    out = subprocess.run(list(args), capture_output=True, text=True)
    assert out.returncode == 0, f"{' '.join(args)}: exit {out.returncode}: {out.stderr}"
    return out.stdout


class Net(nn.Module):
    """A small model with a bit of everything: linear, conv, norm with buffers, embedding."""

    def __init__(self, **kw):
        super().__init__()
        self.embed = nn.Embedding(50, 16, **kw)
        self.conv = nn.Conv1d(16, 16, 3, padding=1, **kw)
        self.norm = nn.BatchNorm1d(16, **kw)
        self.head = nn.Linear(16, 10, **kw)

    def forward(self, ids):
        x = self.embed(ids).transpose(1, 2)
        x = self.norm(self.conv(x)).mean(dim=2)
        return self.head(x)


class Tied(nn.Module):
    """A language-model shape: the output projection is the embedding."""

    def __init__(self, **kw):
        super().__init__()
        self.embed = nn.Embedding(40, 8, **kw)
        self.mid = nn.Linear(8, 8, **kw)
        self.lm_head = nn.Linear(8, 40, bias=False, **kw)
        self.lm_head.weight = self.embed.weight

    def forward(self, ids):
        return self.lm_head(torch.relu(self.mid(self.embed(ids))))


# The C++ benchmark harness's model (bench/harness.cpp), as bench/peers.py builds it.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "bench"))
from peers import D, make_model as harness_model  # noqa: E402


def harness_forward(model):
    """The harness's forward pass and its check value: the output's sum for ones."""
    with torch.no_grad():
        y = torch.ones(1, D)
        for block in model:
            y = block.norm(block.down(block.up(y)))
        return float(y.sum())
