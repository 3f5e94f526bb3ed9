# bash completion for pymailtools postsuper(1), postqueue(1) and mailq(1); mailq.bash and
# postqueue.bash are links to this file (bash-completion loads a file per command name)  -*- shell-script -*-
#
# Queue ids come from the queue directory when it is readable (root, or a per-user queue):
# queue_directory from $PYMAILTOOLS_CONFIG or /etc/pymailtools/config.toml, else the default.
# Install as /usr/share/bash-completion/completions/postsuper (and link postqueue, mailq).

_pymailtools_queue_dir()
{
    local cfg line dir=""
    for cfg in "${PYMAILTOOLS_CONFIG:-}" /etc/pymailtools/config.toml; do
        [[ -n $cfg && -r $cfg ]] || continue
        line=$(command grep -E '^[[:space:]]*queue_directory[[:space:]]*=' "$cfg" 2>/dev/null)
        if [[ $line =~ [\"\']([^\"\']+)[\"\'] ]]; then
            dir=${BASH_REMATCH[1]}
            break
        fi
    done
    if [[ -z $dir ]]; then
        if ((EUID == 0)) || [[ -d /var/spool/pymailtools ]]; then
            dir=/var/spool/pymailtools
        else
            dir=${XDG_STATE_HOME:-$HOME/.local/state}/pymailtools
        fi
    fi
    printf '%s\n' "$dir"
}

# Queue ids of the given states (default: all), only names of [0-9A-Za-z].
_pymailtools_queue_ids()
{
    local dir state f
    dir=$(_pymailtools_queue_dir)
    for state in "${@:-incoming deferred hold}"; do
        for state in $state; do
            [[ -r $dir/$state && -x $dir/$state ]] || continue
            for f in "$dir/$state"/*; do
                f=${f##*/}
                [[ $f =~ ^[0-9A-Za-z]{1,32}$ ]] && printf '%s\n' "$f"
            done
        done
    done
}

_pymailtools_selector_arg()
{
    # Completes the argument of a selector option; returns 1 when $1 is none.
    case $1 in
        --queue)
            mapfile -t COMPREPLY < <(compgen -W "maildrop incoming active deferred hold" -- "$2")
            ;;
        --older-than | --newer-than)
            mapfile -t COMPREPLY < <(compgen -W "1h 2h 6h 12h 1d 2d 3d 5d 1w" -- "$2")
            ;;
        --from | --to | --reason)
            COMPREPLY=()
            ;;
        *) return 1 ;;
    esac
    return 0
}

_pymailtools_selectors="--from --to --older-than --newer-than --queue --reason"

_pymailtools_postsuper()
{
    local cur=${COMP_WORDS[COMP_CWORD]} prev=${COMP_WORDS[COMP_CWORD - 1]}
    _pymailtools_selector_arg "$prev" "$cur" && return
    case $prev in
        -d | -r)
            mapfile -t COMPREPLY < <(compgen -W "ALL - $_pymailtools_selectors $(_pymailtools_queue_ids)" -- "$cur")
            return
            ;;
        -h)
            mapfile -t COMPREPLY < <(compgen -W "ALL - $_pymailtools_selectors $(_pymailtools_queue_ids incoming deferred)" -- "$cur")
            return
            ;;
        -H)
            mapfile -t COMPREPLY < <(compgen -W "ALL - $_pymailtools_selectors $(_pymailtools_queue_ids hold)" -- "$cur")
            return
            ;;
        -c)
            compopt -o filenames 2>/dev/null
            mapfile -t COMPREPLY < <(compgen -f -- "$cur")
            return
            ;;
    esac
    if [[ $cur == -* ]]; then
        mapfile -t COMPREPLY < <(compgen -W "-c -d -h -H -p -r -s -S -v $_pymailtools_selectors" -- "$cur")
        return
    fi
    mapfile -t COMPREPLY < <(compgen -W "hold incoming active deferred maildrop" -- "$cur")
} &&
    complete -F _pymailtools_postsuper postsuper

_pymailtools_postqueue()
{
    local cur=${COMP_WORDS[COMP_CWORD]} prev=${COMP_WORDS[COMP_CWORD - 1]}
    _pymailtools_selector_arg "$prev" "$cur" && return
    case $prev in
        -i)
            mapfile -t COMPREPLY < <(compgen -W "$(_pymailtools_queue_ids)" -- "$cur")
            return
            ;;
        -c)
            compopt -o filenames 2>/dev/null
            mapfile -t COMPREPLY < <(compgen -f -- "$cur")
            return
            ;;
        -s)
            mapfile -t COMPREPLY < <(compgen -A hostname -- "$cur")
            return
            ;;
    esac
    mapfile -t COMPREPLY < <(compgen -W "-c -f -i -j -p -s -v --plain $_pymailtools_selectors" -- "$cur")
} &&
    complete -F _pymailtools_postqueue postqueue

_pymailtools_mailq()
{
    local cur=${COMP_WORDS[COMP_CWORD]} prev=${COMP_WORDS[COMP_CWORD - 1]}
    _pymailtools_selector_arg "$prev" "$cur" && return
    case $prev in
        --explain)
            mapfile -t COMPREPLY < <(compgen -W "$(_pymailtools_queue_ids)" -- "$cur")
            return
            ;;
        -C)
            compopt -o filenames 2>/dev/null
            mapfile -t COMPREPLY < <(compgen -f -- "$cur")
            return
            ;;
    esac
    mapfile -t COMPREPLY < <(compgen -W "--plain --json --explain -C $_pymailtools_selectors" -- "$cur")
} &&
    complete -F _pymailtools_mailq mailq

# ex: filetype=sh
