//! Writes a synthetic pipeline for benchmarks: `synth_pipeline SHAPE STAGES DIR`.
//!
//! SHAPE is `chain` (each stage reads the one before), `fanout` (one root, all others read it),
//! `layered` (layers of 100, each stage reading two of the layer before) or `matrix` (one stage
//! expanded over STAGES values). Each stage writes at most 64 bytes. DIR gets `pipeline.yaml` and the source file `data/source.csv`.

use std::fmt::Write as _;
use std::path::PathBuf;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(shape), Some(n), Some(dir)) = (
        args.get(1),
        args.get(2).and_then(|n| n.parse::<usize>().ok()),
        args.get(3),
    ) else {
        eprintln!("usage: synth_pipeline chain|fanout|layered|matrix STAGES DIR");
        std::process::exit(2);
    };
    let dir = PathBuf::from(dir);
    std::fs::create_dir_all(dir.join("data")).expect("create DIR/data");
    std::fs::write(dir.join("data/source.csv"), "id,value\n1,2\n").expect("write source");
    let mut yaml = String::from("vars:\n  out: out\nstages:\n");
    let stage = |yaml: &mut String, name: &str, inputs: &[String], output: &str| {
        let _ = writeln!(
            yaml,
            "  {name}:\n    cmd: cat {{{{ inputs | join(' ') }}}} | head -c 64 > {{{{ outputs[0] }}}}"
        );
        let _ = writeln!(yaml, "    inputs: [{}]", inputs.join(", "));
        let _ = writeln!(yaml, "    outputs: [\"{{{{ out }}}}/{output}\"]");
    };
    let out = |name: &str| format!("\"{{{{ out }}}}/{name}.txt\"");
    match shape.as_str() {
        "chain" => {
            for i in 0..n {
                let input = if i == 0 {
                    "data/source.csv".to_owned()
                } else {
                    out(&format!("s{}", i - 1))
                };
                stage(&mut yaml, &format!("s{i}"), &[input], &format!("s{i}.txt"));
            }
        }
        "fanout" => {
            stage(
                &mut yaml,
                "root",
                &["data/source.csv".to_owned()],
                "root.txt",
            );
            for i in 1..n {
                stage(
                    &mut yaml,
                    &format!("s{i}"),
                    &[out("root")],
                    &format!("s{i}.txt"),
                );
            }
        }
        "layered" => {
            for i in 0..n {
                let (layer, pos) = (i / 100, i % 100);
                let inputs = if layer == 0 {
                    vec!["data/source.csv".to_owned()]
                } else {
                    let prev = (layer - 1) * 100;
                    vec![
                        out(&format!("s{}", prev + pos)),
                        out(&format!("s{}", prev + (pos + 1) % 100)),
                    ]
                };
                stage(&mut yaml, &format!("s{i}"), &inputs, &format!("s{i}.txt"));
            }
        }
        "matrix" => {
            let values: Vec<String> = (0..n).map(|i| i.to_string()).collect();
            let _ = writeln!(
                yaml,
                "  part:\n    matrix:\n      i: [{}]",
                values.join(", ")
            );
            let _ = writeln!(yaml, "    cmd: cp {{{{ inputs[0] }}}} {{{{ outputs[0] }}}}\n    inputs: [data/source.csv]");
            let _ = writeln!(
                yaml,
                "    outputs: [\"{{{{ out }}}}/part-{{{{ item.i }}}}.txt\"]"
            );
        }
        other => {
            eprintln!("unknown shape `{other}`");
            std::process::exit(2);
        }
    }
    std::fs::write(dir.join("pipeline.yaml"), yaml).expect("write pipeline.yaml");
}
