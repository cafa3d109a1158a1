package demo.common;

import java.util.Map;
import java.util.TreeMap;

/**
 * The lines every test app prints, so one parser reads them all (tests/it/frameworks.rs).
 *
 * <pre>
 * ready id=cloud-1 registered=10.0.0.1:20880 url=dubbo://10.0.0.1:20880/demo.Greeter [tag=NAME]
 * call 1 ok provider=cloud-1 caller=10.0.0.10 name=call-1
 * call 2 failed RpcException: No provider available ...
 * summary calls=2 ok=1 failed=1 providers=cloud-1:1
 * </pre>
 */
public final class Report {
    private Report() {}

    /** One call of a consumer: returns the provider's reply (see {@link #reply}), or throws. */
    public interface Call {
        String call(int index) throws Exception;
    }

    /** The reply of a Greeter provider: who answered, and whom it saw calling. */
    public static String reply(String providerId, String callerAddress, String name) {
        return "provider=" + providerId + " caller=" + callerAddress + " name=" + name;
    }

    /** A provider's "ready" line: registered in its registry as {@code registered}. */
    public static void ready(String providerId, String registered, String detail) {
        System.out.println("ready id=" + providerId + " registered=" + registered
                + (detail.isEmpty() ? "" : " " + detail));
    }

    /**
     * Makes {@code calls} calls, one line each; a failed call is counted, never the end of the
     * run (so "0 of 200 reached the laptop" can be measured). Prints the summary and returns
     * the number of failures.
     */
    public static int calls(int calls, Call call) {
        Map<String, Integer> perProvider = new TreeMap<>();
        int failed = 0;
        for (int i = 1; i <= calls; i++) {
            try {
                String reply = call.call(i);
                perProvider.merge(field(reply, "provider"), 1, Integer::sum);
                System.out.println("call " + i + " ok " + reply);
            } catch (Exception e) {
                failed++;
                String msg = String.valueOf(e.getMessage()).replaceAll("\\s+", " ");
                if (msg.length() > 300) {
                    msg = msg.substring(0, 300) + "...";
                }
                System.out.println("call " + i + " failed " + e.getClass().getSimpleName() + ": " + msg);
            }
        }
        StringBuilder providers = new StringBuilder();
        for (Map.Entry<String, Integer> e : perProvider.entrySet()) {
            providers.append(providers.length() == 0 ? "" : ",").append(e.getKey()).append(':').append(e.getValue());
        }
        System.out.println("summary calls=" + calls + " ok=" + (calls - failed) + " failed=" + failed
                + " providers=" + providers);
        System.out.flush();
        return failed;
    }

    /** The value of {@code key=} in a reply ("?" when absent). */
    public static String field(String reply, String key) {
        for (String word : reply.split(" ")) {
            if (word.startsWith(key + "=")) {
                return word.substring(key.length() + 1);
            }
        }
        return "?";
    }

    /** An integer argument, or {@code fallback} when absent. */
    public static int intArg(String[] args, int index, int fallback) {
        return args.length > index ? Integer.parseInt(args[index]) : fallback;
    }
}
