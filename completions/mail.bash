# bash completion for pymailtools mail(1) / mailx(1)               -*- shell-script -*-
#
# Options may follow recipients (bsd-mailx permutation); "--" ends them.
# Install as /usr/share/bash-completion/completions/mail (and link mailx to it).

_pymailtools_mail()
{
    local cur prev i
    cur=${COMP_WORDS[COMP_CWORD]}
    prev=""
    ((COMP_CWORD > 0)) && prev=${COMP_WORDS[COMP_CWORD - 1]}

    local options_done=0
    for ((i = 1; i < COMP_CWORD; i++)); do
        [[ ${COMP_WORDS[i]} == -- ]] && options_done=1
    done

    if ((!options_done)); then
        case $prev in
            -a)
                # A file to attach (or a "Name: value" header, typed by hand).
                COMPREPLY=($(compgen -f -- "$cur"))
                return
                ;;
            -f)
                COMPREPLY=($(compgen -f -- "$cur"))
                return
                ;;
            -u)
                COMPREPLY=($(compgen -u -- "$cur"))
                return
                ;;
            -A)
                # account blocks of the resource files
                local rc=${MAILRC:-$HOME/.mailrc}
                COMPREPLY=($(compgen -W "$(sed -n 's/^[[:space:]]*ac\(count\)\{0,1\}[[:space:]]\{1,\}\([^[:space:]{]\{1,\}\)[[:space:]]*{.*/\2/p' "$rc" /etc/mail.rc 2>/dev/null)" -- "$cur"))
                return
                ;;
            -:)
                COMPREPLY=($(compgen -W "su s u /" -- "$cur"))
                return
                ;;
            -S)
                COMPREPLY=($(compgen -W "smtp= mta=smtp:// mta=smtps:// mta=submission:// from= hold keepsave escape= skipemptybody smtp-use-starttls smtp-auth= tls-verify= tls-ca-file= tls-ca-dir= tls-ca-no-defaults smtp-auth-user= smtp-auth-password= user= password= netrc-lookup smtp-auth-password-command= smtp-auth-oauth2-token-command= record= folder= v15-compat" -- "$cur"))
                [[ ${COMPREPLY[0]} == *= || ${COMPREPLY[0]} == *// ]] && compopt -o nospace 2>/dev/null
                return
                ;;
            -t)
                COMPREPLY=($(compgen -A hostname -- "$cur"))
                return
                ;;
            --fetch)
                COMPREPLY=($(compgen -W "pop3s:// imaps:// pop3:// imap://" -- "$cur"))
                compopt -o nospace 2>/dev/null
                return
                ;;
            -s | -c | -b | -r)
                COMPREPLY=()
                return
                ;;
        esac
        if [[ $cur == -* ]]; then
            COMPREPLY=($(compgen -W "-s -c -b -a -r -S -A -: -t -E -v -n -N -H -e -f -u -i -I -d -h -V
                --read-recipients --fetch --keep --help --version --" -- "$cur"))
            return
        fi
    fi
    # Recipients: local user names (an address with @ is typed by hand).
    COMPREPLY=($(compgen -u -- "$cur"))
}
complete -F _pymailtools_mail mail mailx
