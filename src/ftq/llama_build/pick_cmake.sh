#!/bin/sh
# Prints the cmake that builds llama.cpp: the system's where it is at least version $1, else $2 (the
# Makefile installs one from PyPI there). A CUDA build needs >= 3.24 (CMAKE_CUDA_ARCHITECTURES=native);
# an older system cmake would fail at configure time, deep in a 5-minute build.
min=$1 fallback=$2
found=$(command -v cmake 2>/dev/null) || { echo "$fallback"; exit 0; }
version=$("$found" --version 2>/dev/null | sed -n 's/^cmake version \([0-9][0-9.]*\).*/\1/p')
lowest=$(printf '%s\n%s\n' "$min" "$version" | sort -V | head -n 1)
if [ -n "$version" ] && [ "$lowest" = "$min" ]; then echo "$found"; else echo "$fallback"; fi
