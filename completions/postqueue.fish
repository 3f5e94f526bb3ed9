# fish completion for pymailtools postqueue(1): modes, queue ids (from the queue directory when
# readable) and selectors.  Install as ~/.config/fish/completions/postqueue.fish.

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

complete -c postqueue -f
complete -c postqueue -s c -r -F -d 'configuration directory or file'
complete -c postqueue -s f -d 'flush: attempt every queued message now'
complete -c postqueue -s i -x -a '(__pymailtools_queue_ids)' -d 'attempt this message now'
complete -c postqueue -s j -d 'list the queue as JSON lines'
complete -c postqueue -s p -d 'list the queue like mailq'
complete -c postqueue -s s -x -a '(__fish_print_hostnames)' -d 'attempt the messages for this site now'
complete -c postqueue -s v -d 'verbose'
complete -c postqueue -l plain -d 'with -p: Postfix text even on a terminal'
complete -c postqueue -l from -x -d 'sender matches PATTERN'
complete -c postqueue -l to -x -d 'an undelivered recipient matches PATTERN'
complete -c postqueue -l older-than -x -a '1h 2h 6h 12h 1d 2d 3d 5d 1w' -d 'arrived more than AGE ago'
complete -c postqueue -l newer-than -x -a '1h 2h 6h 12h 1d 2d 3d 5d 1w' -d 'arrived less than AGE ago'
complete -c postqueue -l queue -x -a 'maildrop incoming active deferred hold' -d 'in this queue'
complete -c postqueue -l reason -x -d 'a deferral reason matches PATTERN'
