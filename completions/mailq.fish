# fish completion for pymailtools mailq(1): output forms, --explain with queue ids (from the
# queue directory when readable) and selectors.  Install as ~/.config/fish/completions/mailq.fish.

function __pymailtools_queue_ids
    set -l dir
    for cfg in $PYMAILTOOLS_CONFIG /etc/pymailtools/config.toml
        test -r "$cfg"; or continue
        set -l line (string match -r -- '^\s*queue_directory\s*=\s*["\']([^"\']+)' < $cfg)
        if test (count $line) -ge 2
            set dir $line[2]
            break
        end
    end
    if test -z "$dir"
        if test (id -u) -eq 0; or test -d /var/spool/pymailtools
            set dir /var/spool/pymailtools
        else if set -q XDG_STATE_HOME
            set dir $XDG_STATE_HOME/pymailtools
        else
            set dir $HOME/.local/state/pymailtools
        end
    end
    for state in incoming deferred hold
        test -r $dir/$state -a -x $dir/$state; or continue
        for f in $dir/$state/*
            string match -qr -- '^[0-9A-Za-z]{1,32}$' (basename $f); and basename $f
        end
    end
end

complete -c mailq -f
complete -c mailq -s C -r -F -d 'configuration file'
complete -c mailq -l plain -d 'Postfix text even on a terminal'
complete -c mailq -l json -d 'one JSON object per message, as postqueue -j'
complete -c mailq -l explain -x -a '(__pymailtools_queue_ids)' -d 'one message and its delivery attempts'
complete -c mailq -l from -x -d 'sender matches PATTERN'
complete -c mailq -l to -x -d 'an undelivered recipient matches PATTERN'
complete -c mailq -l older-than -x -a '1h 2h 6h 12h 1d 2d 3d 5d 1w' -d 'arrived more than AGE ago'
complete -c mailq -l newer-than -x -a '1h 2h 6h 12h 1d 2d 3d 5d 1w' -d 'arrived less than AGE ago'
complete -c mailq -l queue -x -a 'maildrop incoming active deferred hold' -d 'in this queue'
complete -c mailq -l reason -x -d 'a deferral reason matches PATTERN'
