# bash completion for pymailtools postmap(1) and postalias(1); postalias.bash is a link to this
# file (bash-completion loads a file per command name)  -*- shell-script -*-
#
# Table arguments complete as type: prefixes and file names.
# Install as /usr/share/bash-completion/completions/postmap (and link postalias).

_pymailtools_postmap()
{
    local cur=${COMP_WORDS[COMP_CWORD]} prev=${COMP_WORDS[COMP_CWORD - 1]}
    case $prev in
        -c)
            compopt -o filenames 2>/dev/null
            mapfile -t COMPREPLY < <(compgen -d -- "$cur")
            return
            ;;
        -q)
            mapfile -t COMPREPLY < <(compgen -W "-" -- "$cur")
            return
            ;;
    esac
    if [[ $cur == -* ]]; then
        mapfile -t COMPREPLY < <(compgen -W "-c -f -N -n -o -p -q -r -s -v -w" -- "$cur")
        return
    fi
    compopt -o filenames -o nospace 2>/dev/null
    if [[ $cur == *:* ]]; then
        local type=${cur%%:*}
        mapfile -t COMPREPLY < <(compgen -f -- "${cur#*:}")
        COMPREPLY=("${COMPREPLY[@]/#/$type:}")
    else
        mapfile -t COMPREPLY < <(compgen -W "hash: lmdb: texthash: regexp: pcre: inline: static:" -- "$cur"; compgen -f -- "$cur")
    fi
} &&
    complete -F _pymailtools_postmap postmap postalias

# ex: filetype=sh
