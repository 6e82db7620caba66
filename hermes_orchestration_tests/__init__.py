"""Tests of hermes_orchestration, mirroring the package; they read as specifications."""
