//! Generates Rust code for `protos/*.proto` with the pure-Rust protobuf 2 codegen (no `protoc`).
use std::{env, fs, path::PathBuf};

fn main() {
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("pb");
    fs::create_dir_all(&out).expect("create OUT_DIR/pb");
    let mut inputs: Vec<PathBuf> = fs::read_dir("protos")
        .expect("read protos/")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "proto"))
        .collect();
    inputs.sort();
    for p in &inputs {
        println!("cargo:rerun-if-changed={}", p.display());
    }
    println!("cargo:rerun-if-changed=protos");
    protobuf_codegen_pure::Codegen::new()
        .out_dir(&out)
        .inputs(&inputs)
        .include("protos")
        .customize(protobuf_codegen_pure::Customize {
            gen_mod_rs: Some(true),
            carllerche_bytes_for_bytes: Some(true),
            ..Default::default()
        })
        .run()
        .expect("protobuf codegen");
}
