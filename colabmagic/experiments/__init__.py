"""Batch experiments: experiments.json queue, runner, git-watching daemon, sync, grid."""
