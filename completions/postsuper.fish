# fish completion for pymailtools postsuper(1): options, queue ids (from the queue directory
# when readable), ALL, "-", selectors and queue names.
# Install as ~/.config/fish/completions/postsuper.fish or in a vendor_completions.d directory.

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
    set -l states $argv
    test (count $states) -eq 0; and set states incoming deferred hold
    for state in $states
        test -r $dir/$state -a -x $dir/$state; or continue
        for f in $dir/$state/*
            string match -qr -- '^[0-9A-Za-z]{1,32}$' (basename $f); and basename $f
        end
    end
end

complete -c postsuper -f
complete -c postsuper -s c -r -F -d 'configuration directory or file'
complete -c postsuper -s d -x -a 'ALL - (__pymailtools_queue_ids)' -d 'delete'
complete -c postsuper -s h -x -a 'ALL - (__pymailtools_queue_ids incoming deferred)' -d 'put on hold'
complete -c postsuper -s H -x -a 'ALL - (__pymailtools_queue_ids hold)' -d 'release from hold'
complete -c postsuper -s r -x -a 'ALL - (__pymailtools_queue_ids)' -d 'requeue'
complete -c postsuper -s p -d 'purge temporary files left by crashes'
complete -c postsuper -s s -d 'check the queue structure'
complete -c postsuper -s S -d 'check the queue structure'
complete -c postsuper -s v -d 'verbose: name each message'
complete -c postsuper -l from -x -d 'sender matches PATTERN'
complete -c postsuper -l to -x -d 'an undelivered recipient matches PATTERN'
complete -c postsuper -l older-than -x -a '1h 2h 6h 12h 1d 2d 3d 5d 1w' -d 'arrived more than AGE ago'
complete -c postsuper -l newer-than -x -a '1h 2h 6h 12h 1d 2d 3d 5d 1w' -d 'arrived less than AGE ago'
complete -c postsuper -l queue -x -a 'maildrop incoming active deferred hold' -d 'in this queue'
complete -c postsuper -l reason -x -d 'a deferral reason matches PATTERN'
complete -c postsuper -n 'not string match -q -- "-*" (commandline -ct)' -a 'hold incoming active deferred maildrop' -d 'queue'
