//! Login options that netmount and netcp both take (`#[command(flatten)]`). OWNED BY: client.
