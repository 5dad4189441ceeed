"""Orchestration: experiment config, grid, pipeline, runner, executors, record, claims, tracking, tuning."""
