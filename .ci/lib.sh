# Sourced by .ci/run and .ci/setup.sh: `step WHAT COMMAND...` says what it is doing, prints
# a line every 30 s while COMMAND runs (a source build can be quiet for minutes), and says
# how long it took, or that it failed.

elapsed() {  # elapsed START_SECONDS -> "4m05s"
    local s=$((SECONDS - $1))
    printf '%dm%02ds' $((s / 60)) $((s % 60))
}

step() {
    local what=$1 start=$SECONDS next=30 pid rc=0
    shift
    echo "== $what"
    "$@" &
    pid=$!
    while kill -0 "$pid" 2>/dev/null; do
        sleep 1
        if ((SECONDS - start >= next)); then
            echo "   ... still running ($(elapsed "$start"))"
            next=$((next + 30))
        fi
    done
    wait "$pid" || rc=$?
    if ((rc != 0)); then
        echo "== FAILED (exit $rc) after $(elapsed "$start"): $what"
        return "$rc"
    fi
    echo "   done in $(elapsed "$start")"
}
