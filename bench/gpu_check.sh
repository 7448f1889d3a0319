#!/usr/bin/env bash
exec bash "$(dirname "$0")/perf/gpu_check.sh" "$@"  # the check itself: bench/perf/gpu_check.sh
