# bash completion for pymailtools mailx(1): the same as mail(1), loaded by bash-completion
# under the command's own name.                                    -*- shell-script -*-
. "${BASH_SOURCE[0]%/*}/mail"
