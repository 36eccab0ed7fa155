#!/usr/bin/env bash
# Pack a lab run directory's finished runs (config, env and every run's files; no lock, no
# report) into a compressed tarball, or unpack one, so that a run of many hours can go on from
# another machine: the lab resumes from the files on disk.
#   tools/lab_archive.sh pack   runs/lab-full docs/lab-results/full/run-dir.tar.xz
#   tools/lab_archive.sh unpack docs/lab-results/full/run-dir.tar.xz runs/lab-full
set -euo pipefail
case "${1:-}" in
  pack)
    dir=${2:?run directory}; out=${3:?archive}
    test -f "$dir/config.json" || { echo "lab_archive: $dir has no config.json (not a lab run directory)" >&2; exit 2; }
    tmp="$out.tmp"
    tar -C "$dir" --exclude=.lock --exclude='*.tmp' -cJf "$tmp" config.json env.json runs
    mv "$tmp" "$out"
    echo "$out: $(tar -tJf "$out" | grep -c 'result.json$') finished runs, $(du -h "$out" | cut -f1)"
    ;;
  unpack)
    arc=${2:?archive}; dir=${3:?run directory}
    if [ -e "$dir/config.json" ]; then echo "lab_archive: $dir already holds a run; unpack into an empty directory" >&2; exit 2; fi
    mkdir -p "$dir"
    tar -C "$dir" -xJf "$arc"
    echo "$dir: $(find "$dir" -name result.json | wc -l) finished runs"
    ;;
  *) echo "usage: tools/lab_archive.sh pack RUN_DIR ARCHIVE | unpack ARCHIVE RUN_DIR" >&2; exit 2 ;;
esac
