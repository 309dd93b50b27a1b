#!/usr/bin/env bash
# Builds the Spring Kafka caller (pom.xml, src/) once per version of its sources, into the
# cache beside the Kafka jars, and prints the Java classpath that runs it:
#
#   java -cp "$(bash tests/spring/build.sh)" kafkarerank.spring.SpringCaller ...
#
# The first build downloads spring-kafka and Maven's plugins from Maven Central into
# $RERANK_CACHE_DIR/m2; later calls print the cached classpath at once. Nothing is written
# into the repository. Needs Java 17+ and Maven (mvn).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE_DIR="$(realpath -m "${RERANK_CACHE_DIR:-$HOME/.cache/kafka-rerank}")"
REPO_M2="$CACHE_DIR/m2"
BUILDS="$CACHE_DIR/spring-caller"

die() {
    echo "spring-caller: error: $*" >&2
    exit 1
}

# One build per content of the sources: an edited caller is built again, an unchanged one never.
version="$(cd "$HERE" && find pom.xml src -type f | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-16)"
OUT="$BUILDS/$version"
if [[ -f $OUT/classpath ]]; then
    cat "$OUT/classpath"
    exit 0
fi

command -v java >/dev/null || die "java not found on PATH (the Spring caller needs Java 17+)"
command -v mvn >/dev/null || die "Maven (mvn) is needed to build the Spring caller"
mkdir -p "$BUILDS"
exec 8>"$BUILDS/.build.lock"
flock 8
if [[ ! -f $OUT/classpath ]]; then
    work="$(mktemp -d "$BUILDS/.build.XXXXXX")"
    log="$BUILDS/build.log"
    cp -r "$HERE/pom.xml" "$HERE/src" "$work/"
    if ! mvn -q -B -f "$work/pom.xml" -Dmaven.repo.local="$REPO_M2" -DbuildDir="$work/target" \
        compile dependency:build-classpath -Dmdep.outputFile="$work/dependencies" >"$log" 2>&1; then
        rm -rf "$work"
        die "building the Spring caller with Maven failed (log: $log)"
    fi
    mv -T "$work" "$OUT"
    # Written last: its presence means the build is complete.
    echo "$OUT/target/classes:$(cat "$OUT/dependencies")" >"$OUT/classpath.tmp"
    mv "$OUT/classpath.tmp" "$OUT/classpath"
fi
cat "$OUT/classpath"
