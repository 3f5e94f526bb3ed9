# bash completion for pymailtools-oauth2(1): subcommands, their options, providers and files.
# -*- shell-script -*-
# Install as /usr/share/bash-completion/completions/pymailtools-oauth2.

_pymailtools_oauth2()
{
    local cur=${COMP_WORDS[COMP_CWORD]} prev=${COMP_WORDS[COMP_CWORD - 1]}
    local sub=${COMP_WORDS[1]}
    if ((COMP_CWORD == 1)); then
        mapfile -t COMPREPLY < <(compgen -W "authorize token --help" -- "$cur")
        return
    fi
    case $prev in
        --provider)
            mapfile -t COMPREPLY < <(compgen -W "google microsoft custom" -- "$cur")
            return
            ;;
        --store | --ca-file)
            compopt -o filenames 2>/dev/null
            mapfile -t COMPREPLY < <(compgen -f -- "$cur")
            return
            ;;
        --client-secret-command)
            mapfile -t COMPREPLY < <(compgen -c -- "$cur")
            return
            ;;
        --account | --client-id | --device-endpoint | --token-endpoint | --scope | --tenant)
            return
            ;;
    esac
    case $sub in
        authorize)
            mapfile -t COMPREPLY < <(compgen -W "--account --provider --client-id
                --client-secret-command --device-endpoint --token-endpoint --scope --tenant
                --store --ca-file --help" -- "$cur")
            ;;
        token)
            mapfile -t COMPREPLY < <(compgen -W "--account --store --json --help" -- "$cur")
            ;;
    esac
} &&
    complete -F _pymailtools_oauth2 pymailtools-oauth2

# ex: filetype=sh
