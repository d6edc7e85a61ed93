"""inspect-image: reference -> source -> manifest/config -> layers -> facts, never a whole layer
in memory."""
