#!/usr/bin/env bash
# On the CPU machine: re-splits the vLLM bundle (.gpu-bundle/, ../shared/gpu/build-bundle:
# 4 parts of 60 MiB) into parts of at most PART_MB (default 40) MB, so that one part
# and the working tree fit a device call's 64 MiB. The parts' concatenation (and so
# the bundle's checksum id) is unchanged; stage.sh is rewritten to wait for the new
# count. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/../.."
b=.gpu-bundle
mb=${PART_MB:-40}
n=$(ls $b/part-* | wc -l)
tmp=$(mktemp -d)
cat $b/part-* > "$tmp/whole"
rm -f $b/part-*
split -b "${mb}000000" -d -a 2 "$tmp/whole" $b/part-
rm -rf "$tmp"
m=$(ls $b/part-* | wc -l)
sed -i -E "s/all [0-9]+ parts/all $m parts/; s/-lt [0-9]+ \]/-lt $m ]/; s/of [0-9]+ parts staged/of $m parts staged/" $b/stage.sh
echo "bundle: $n parts -> $m parts of at most ${mb} MB"
ls -la $b
