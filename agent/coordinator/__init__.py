"""Coordinator: system model, solver, online controller and policies.

Modules: `model` (options from a bundle profile; latency and energy), `solver` (exact
per-option (f, p) and the global choice; the brute-force grid it is tested against),
`policies` (joint, device-only, server-only, fixed-split), `config` (ControllerConfig),
`online` (OnlineController) with what it keeps per gateway: `state`, `estimates`,
`overhead` (per-frame overhead and floor), `residual` (each path's measured-minus-planned
latency), `trials` (of the server path near a tie), `fallback`; `fastest` (the latency
preference's knobs), `scenario` and `plan` (`edgetok plan`), `synthetic` (made-up manifests
for tests and what-if planning). numpy and pydantic only: no torch, no scipy.
"""
