"""mail(1)'s library: composing, reading folders, handing a message on."""
