"""The `chexmem` command line, the study runner, reports and benchmarks."""
