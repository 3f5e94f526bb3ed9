# fish completion for pymailtools mailx(1): the same as mail(1) (fish loads a file per command).
source (status dirname)/mail.fish
