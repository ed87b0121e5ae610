//! What netcp needs: verified, resumable transfers, progress, and the FTP-style shell. OWNED BY: netcp.
