//! What netmount needs: the FUSE file system over the client. OWNED BY: fuse.
