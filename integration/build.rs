//! Marks the PostgreSQL tests ignored, so that `cargo test` lists them as such, when no
//! server is given: `TOWER_BACKGROUND_POSTGRES` names one, and
//! `TOWER_BACKGROUND_REQUIRE_POSTGRES=1` (CI) makes a missing one a failure instead.
fn main() {
    println!("cargo::rustc-check-cfg=cfg(postgres_server)");
    println!("cargo::rerun-if-env-changed=TOWER_BACKGROUND_POSTGRES");
    println!("cargo::rerun-if-env-changed=TOWER_BACKGROUND_REQUIRE_POSTGRES");
    let given = std::env::var_os("TOWER_BACKGROUND_POSTGRES").is_some();
    let required = std::env::var("TOWER_BACKGROUND_REQUIRE_POSTGRES").is_ok_and(|v| v == "1");
    if given || required {
        println!("cargo::rustc-cfg=postgres_server");
    }
}
