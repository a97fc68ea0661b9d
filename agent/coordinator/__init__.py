"""Coordinator: system model, solver, online controller and policies."""
