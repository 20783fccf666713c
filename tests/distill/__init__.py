"""Tests of h1rl.distill (a package, so that its conftest and test_run.py do not clash with other test folders)."""
